"""An HTTP server written for the graft API: it binds an endpoint by name, not an address.

    graft run -n web --endpoint 'ep-http type ipv4 addr 127.0.0.1 port 8080' -- \
        python3 examples/api_http_server.py ep-http [DIRECTORY]
"""
import functools
import http.server
import sys

import sockgraft


class GraftedHTTPServer(http.server.ThreadingHTTPServer):
    def __init__(self, endpoint: str, handler):
        super().__init__(("", 0), handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sockgraft.create_server(endpoint)
        self.server_address = self.socket.getsockname()[:2]


def main() -> None:
    endpoint = sys.argv[1] if len(sys.argv) > 1 else "ep-http"
    directory = sys.argv[2] if len(sys.argv) > 2 else "."
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    with GraftedHTTPServer(endpoint, handler) as httpd:
        host, port = httpd.server_address
        print(f"serving {directory} on endpoint {endpoint} = host {host} port {port}", flush=True)
        httpd.serve_forever()


if __name__ == "__main__":
    main()
