"""The attach modes, one folder each (`api/`, `preload/`, `seccomp/`), on `base.Attach`;
`registry.MODES` names them."""
