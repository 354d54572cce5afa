"""`m3 query MEMORY "phrase"`: the query engine from the command line (the memory server's answer, offline)."""
from __future__ import annotations

import json
import time
from pathlib import Path


def register(verbs) -> None:
    # Options left out keep QueryOptions' defaults (None here): registering the verb must not import torch.
    query = verbs.add_parser("query", help="locate a phrase in a trained memory (offline, as the memory server does)")
    query.add_argument("memory", type=Path)
    query.add_argument("query")
    query.add_argument("--model", default=None, help="which of the memory's models to query (default: the first)")
    query.add_argument("--method", choices=["otsu", "relevancy"], default=None,
                       help="pixel scoring (default: otsu)")
    query.add_argument("--render", choices=["scores", "features"], default=None,
                       help="views from blended per-Gaussian scores (fast) or decoded per pixel (the paper's path)")
    query.add_argument("--negatives", nargs="+", default=None, help="relevancy: phrases the query must beat")
    query.add_argument("--instances", type=int, default=None, help="instances to return")
    query.add_argument("--views", type=int, default=None, help="training views to render")
    query.add_argument("--min-relevancy", type=float, default=None,
                       help="the answer must beat the canonical negatives by this LERF relevancy (0: no check)")
    query.add_argument("--save", type=Path, default=None, help="write a picture of each answer's view into this folder")
    query.set_defaults(func=_query)


def _query(args) -> int:
    from m3_memory.core.checkpoint import load_memory
    from m3_memory.core.engine import QueryEngine, QueryOptions

    given = {"method": args.method, "render": args.render, "max_instances": args.instances,
             "max_search_views": args.views, "min_relevancy": args.min_relevancy,
             "negatives": tuple(args.negatives) if args.negatives else None}
    options = QueryOptions(**{name: value for name, value in given.items() if value is not None})
    memory, _ = load_memory(args.memory)
    engine = QueryEngine(memory, args.model)
    started = time.monotonic()
    answer = engine.answer(args.query, None, options)
    elapsed_ms = (time.monotonic() - started) * 1000
    report = answer_json(answer, memory.world_frame, elapsed_ms)
    if args.save is not None:
        report["picture"] = save_picture(memory, answer, args.save)
    print(json.dumps(report))
    return 0


def save_picture(memory, answer, directory: Path) -> str | None:
    """The answer's view rendered, its heatmap over it and the chosen region outlined, as DIR/<phrase>.png."""
    from m3_memory.core.pictures import save_answer_pictures

    if answer.heatmap_camera is None:
        return None
    stem = "".join(c if c.isalnum() else "_" for c in answer.query).strip("_")[:60] or "answer"
    path = save_answer_pictures(answer, memory.render(answer.heatmap_camera).rgb, directory, stem)
    return None if path is None else str(path)


def answer_json(answer, frame: str, elapsed_ms: float) -> dict:
    """The JSON `m3 query` prints for `answer`."""
    return {"query": answer.query, "target": answer.point.round(4).tolist(), "score": round(answer.score, 4),
            "frame_id": frame, "view": answer.heatmap_view, "locate_ms": round(elapsed_ms, 1),
            "rendered": None if answer.rendered_point is None else answer.rendered_point.round(4).tolist(),
            "instances": [{"point": i.point.round(4).tolist(), "extent": i.extent.round(4).tolist(),
                           "score": round(i.score, 4), "views_seen": i.views_seen, "gaussians": len(i.gaussians)}
                          for i in answer.instances],
            "notes": answer.notes}
