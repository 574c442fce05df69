"""The pure core: no syscalls, no I/O. Endpoints, ingress pairs and egress rules, the engine that
decides every operation (`engine.Policy.decide`), the fd-service wire format and the shared tables."""
