"""Coverage-guided fuzzing (atheris) of every decoder that takes input from a container or a user:
the fd-service protocol, endpoint specs, ingress/egress specs, sockaddr decoding and the OCI
container state that runc sends graftd's seccomp agent.
Any exception other than the decoder's own documented "bad input" error is a crash: each target
lists exactly that one class (never ValueError or IndexError, which would hide real bugs).

    python3 tests/fuzz/fuzz_decoders.py -max_total_time=60
"""
import sys

import atheris

with atheris.instrument_imports():
    from sockgraft.core import endpoint
    from sockgraft.core import protocol
    from sockgraft.core import rules
    from sockgraft.runtime import ociagent
    from sockgraft.modes.seccomp import kernel

TARGETS = [
    (lambda b: protocol.parse_request(b), (protocol.ProtocolError,)),
    (lambda b: protocol.parse_reply(b), (protocol.ProtocolError,)),
    (lambda b: endpoint.parse_endpoint(b.decode("utf-8", "surrogateescape")), (endpoint.SpecError,)),
    (lambda b: rules.parse_ingress(b.decode("utf-8", "surrogateescape")), (endpoint.SpecError,)),
    (lambda b: rules.parse_egress(b.decode("utf-8", "surrogateescape")), (endpoint.SpecError,)),
    (lambda b: kernel.decode_sockaddr(b), (kernel.BadSockaddr,)),
    (lambda b: ociagent.parse_message(b, []), (ociagent.AgentError,)),
]


def one_input(data: bytes) -> None:
    if not data:
        return
    target, expected = TARGETS[data[0] % len(TARGETS)]
    try:
        target(data[1:])
    except expected:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
