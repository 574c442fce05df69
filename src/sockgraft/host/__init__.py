"""Syscall plumbing in the host netns: namespaces, host sockets, the state store, the audit log,
metrics and where things live on disk."""
