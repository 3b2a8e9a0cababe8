"""``python -m devtools.stripe_local --port N --state FILE``: run the local Stripe server."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from devtools.stripe_local._server import StripeServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devtools.stripe_local", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=12111, help="TCP port (0 = any free port)")
    parser.add_argument("--state", type=Path, default=None, help="sqlite state file (default: in memory)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    server = StripeServer(args.state, host=args.host, port=args.port)
    print(f"local stripe listening on {server.url} (state: {args.state or 'memory'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
