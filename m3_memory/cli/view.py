"""`m3 view MEMORY`: the memory in a browser (viser) with text queries; Ctrl-C stops it."""
from __future__ import annotations

import json
import signal
import threading
from pathlib import Path


def _view(args) -> int:
    from m3_memory.core.checkpoint import load_memory
    from m3_memory.viewer import Viewer

    memory, _ = load_memory(args.memory)
    viewer = Viewer(memory, host=args.host, port=args.port, model=args.model)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # One line when the page is being served (tests and scripts wait for it).
    print(json.dumps({"url": viewer.url, "gaussians": len(memory.gaussians), "model": viewer.engine.model}), flush=True)
    stop.wait()
    viewer.close()
    return 0


def register(verbs) -> None:
    view = verbs.add_parser("view", help="open a memory in the browser: splats, cameras, text queries (viser)")
    view.add_argument("memory", type=Path)
    view.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: reachable from other computers)")
    view.add_argument("--port", type=int, default=8080)
    view.add_argument("--model", default=None, help="which of the memory's models to query (default: the first)")
    view.set_defaults(func=_view)
