"""`m3 export MEMORY --ply OUT.ply`: the Gaussians as a standard 3DGS .ply, in their colours, a PCA of their decoded
features (`--semantic`) or a query's relevancy (`--query`)."""
from __future__ import annotations

import json
from pathlib import Path


def _export(args) -> int:
    from m3_memory.core.checkpoint import load_memory
    from m3_memory.core.engine import QueryEngine, QueryOptions
    from m3_memory.core.export import export_ply, relevancy_colours, semantic_colours

    memory, _ = load_memory(args.memory)
    colours, summary = None, {"colour": "rgb"}
    if args.semantic or args.query:
        engine = QueryEngine(memory, args.model)
        summary["model"] = engine.model
        if args.semantic:
            colours, summary["colour"] = semantic_colours(engine.features), "semantic PCA"
        else:
            answer = engine.answer(args.query, options=QueryOptions(method=args.method))
            colours, summary["colour"] = relevancy_colours(answer.gaussian_scores), f"relevancy of {answer.query!r}"
            summary["matching"] = int((answer.gaussian_scores > answer.threshold).sum())
    path = export_ply(memory, args.ply, colours)
    print(json.dumps({"ply": str(path), "gaussians": len(memory.gaussians), **summary}))
    return 0


def register(verbs) -> None:
    export = verbs.add_parser("export", help="write a memory's Gaussians as a .ply (3DGS layout) for splat viewers")
    export.add_argument("memory", type=Path)
    export.add_argument("--ply", type=Path, required=True, help="output .ply path")
    colour = export.add_mutually_exclusive_group()
    colour.add_argument("--semantic", action="store_true", help="colour by a PCA of the decoded features")
    colour.add_argument("--query", default=None, metavar="PHRASE", help="colour by relevancy to PHRASE")
    export.add_argument("--method", choices=["otsu", "relevancy"], default="otsu", help="scoring for --query")
    export.add_argument("--model", default=None, help="which of the memory's models (default: the first)")
    export.set_defaults(func=_export)
