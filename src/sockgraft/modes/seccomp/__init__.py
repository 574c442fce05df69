"""Seccomp mode: unmodified programs (static binaries, Go) grafted by a supervisor in the host netns
that receives their socket syscalls through seccomp user notification. See docs/SECCOMP.md."""
