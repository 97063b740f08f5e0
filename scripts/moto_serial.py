"""moto's server mode, one request at a time.

DynamoDB evaluates every conditional write atomically on the latest version of the item. moto's
own `moto_server` runs a threaded WSGI server and checks a condition and writes the item without
a lock, so two concurrent conditional writes on one item can both succeed (see the crate docs of
idemgate-store-dynamodb). This launcher runs moto's application behind one lock, keeping the
threaded server (keep-alive connections) but serving one request at a time.

Usage: python moto_serial.py HOST PORT
"""

import sys
import threading

from werkzeug.serving import run_simple

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialized(environ, start_response):
        with lock:
            result = app(environ, start_response)
            try:
                return [b"".join(result)]
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()

    run_simple(
        host,
        port,
        serialized,
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
