"""`m3 locate "PHRASE"`: ask the running memory server where something is."""
from __future__ import annotations

import json
import sys


def register(verbs) -> None:
    parser = verbs.add_parser("locate", help="ask the running memory server (/m3/locate) where an object is")
    parser.add_argument("query", help='what to find, e.g. "yellow bath duck"')
    parser.add_argument("--frame", default="", help="frame of the answer (default: the memory's world frame)")
    parser.add_argument("--namespace", default="", metavar="NS",
                        help="namespace of the memory server (the launch file's namespace:=), e.g. robot1")
    parser.add_argument("--service", default=None, help="service name (default /NS/m3/locate)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server and its answer")
    parser.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    parser.set_defaults(func=run)


def run(args) -> int:
    import rclpy
    from m3_msgs.srv import Locate

    from m3_memory.ros.graph_client import call_service, namespaced

    service = args.service or namespaced(args.namespace, "m3/locate")
    request = Locate.Request(query=args.query, frame_id=args.frame)
    try:
        response = call_service(Locate, service, request, args.timeout)
    except TimeoutError as exc:
        print(f"m3 locate: {exc}", file=sys.stderr)
        return 1
    finally:
        rclpy.try_shutdown()
    point = response.target.point
    answer = {"query": args.query, "success": response.success, "message": response.message,
              "frame_id": response.target.header.frame_id, "target": [point.x, point.y, point.z],
              "score": response.score}
    if args.json:
        print(json.dumps(answer))
    elif response.success:
        print(f"{args.query!r}: ({point.x:.3f}, {point.y:.3f}, {point.z:.3f}) in {answer['frame_id']}, "
              f"score {response.score:.2f}")
    else:
        print(f"{args.query!r}: not located: {response.message}")
    return 0 if response.success else 1
