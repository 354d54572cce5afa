"""A viser viewer of an M3 memory: its Gaussians as splats, its training cameras as frustums, and text queries.

A query (positive phrase, optional comma-separated negatives) paints the Gaussians whose score is above the threshold
slider in HIGHLIGHT_RGB and draws the answer: each instance's point and extent box, the grasp frame, the list of
instances and the heatmap of the view it was seen best from (the render with the heatmap over it). `set_memory`
swaps the memory (the memory server calls it when it loads a new one) and asks the last phrase again.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from m3_memory.core.engine import QueryEngine, QueryOptions
from m3_memory.core.errors import M3Error
from m3_memory.core.export import gaussian_rgb
from m3_memory.core.pictures import overlay
from m3_memory.core.views import TrainingViews

HIGHLIGHT_RGB = (255, 0, 255)   # matching Gaussians: magenta, a colour no demo object has
TARGET_RGB = (255, 40, 40)
DIMMING = 0.6                   # the rest of the scene is drawn at this brightness while a query is shown


def splat_arrays(memory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian centres `[N, 3]`, covariances `[N, 3, 3]` (R diag(s²) Rᵀ) and opacities `[N, 1]` for viser."""
    p = {name: value.detach().cpu().float() for name, value in memory.gaussians.params.items()}
    w, x, y, z = torch.nn.functional.normalize(p["quats"], dim=1).unbind(1)
    rotation = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], dim=1).reshape(-1, 3, 3)
    scales = torch.exp(p["scales"])
    covariances = rotation @ torch.diag_embed(scales ** 2) @ rotation.transpose(1, 2)
    return p["means"].numpy(), covariances.numpy(), torch.sigmoid(p["opacities"])[:, None].numpy()


class Viewer:
    """Serves `memory` at http://host:port until `close()`; `model` picks which of its models queries go to."""

    def __init__(self, memory, host: str = "127.0.0.1", port: int = 8080, model: str | None = None):
        import viser

        self.model = model
        self._lock = threading.RLock()
        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.server.scene.set_up_direction("+z")
        gui = self.server.gui
        self.phrase = gui.add_text("Find", "", hint="what to look for, e.g. yellow bath duck")
        self.negatives = gui.add_text("Negatives", "", hint="optional, comma-separated: then a match must beat each "
                                                            "of them (LERF relevancy) instead of Otsu on cosine")
        ask = gui.add_button("Ask")
        self.threshold = gui.add_slider("Threshold", 0.0, 1.0, 0.005, 0.5,
                                        hint="Gaussians scoring above it are highlighted (set by each answer)")
        self.message = gui.add_markdown("Type a phrase and press **Ask**.")
        self.instance_list = gui.add_markdown("")
        self.heatmap = gui.add_image(np.zeros((2, 2, 3), np.uint8), label="heatmap", visible=False)
        ask.on_click(lambda _: self.ask(self.phrase.value, self.negatives.value))
        self.threshold.on_update(lambda _: self._paint())
        self.answer = None
        self.set_memory(memory)

    @property
    def url(self) -> str:
        return f"http://{self.server.get_host()}:{self.server.get_port()}"

    def set_memory(self, memory) -> None:
        """Show `memory` instead of the current one (splats, cameras, a fresh query engine); the last query, if any,
        is asked again of it."""
        with self._lock:
            self.memory = memory
            self.engine = QueryEngine(memory, self.model)
            self.centres, self.covariances, self.opacities = splat_arrays(memory)
            self.colours = gaussian_rgb(memory)
            self._draw_cameras(memory.views)
            phrase = None if self.answer is None else (self.answer.query, self.negatives.value)
            self.answer = None
            self._paint()
            self._clear_answer()
        if phrase is not None:
            self.ask(*phrase)

    def _draw_cameras(self, views: TrainingViews) -> None:
        from viser.transforms import SO3

        low, high = np.percentile(self.centres, [5, 95], axis=0)
        size = 0.05 * float(np.linalg.norm(high - low))   # frustums scaled to the scene
        fov = 2 * np.arctan2(views.height / 2, views.K[:, 1, 1])
        for i, c2w in enumerate(views.c2w):   # viser's camera frame is the optical one (x right, y down, z forward)
            self.server.scene.add_camera_frustum(f"/cameras/{i}", fov=float(fov[i]), aspect=views.width / views.height,
                                                 scale=size, thickness=1.5, thickness_units="screen", color=(90, 90, 90), wxyz=SO3.from_matrix(c2w[:3, :3]).wxyz,
                                                 position=c2w[:3, 3])
        centre = np.median(self.centres, axis=0)
        first = views.c2w[0]
        self.server.initial_camera.up = (0.0, 0.0, 1.0)
        self.server.initial_camera.position = centre + 1.5 * (first[:3, 3] - centre)   # behind the first camera
        self.server.initial_camera.look_at = centre
        self.server.initial_camera.fov = float(fov[0])

    def _query(self, phrase: str, negatives: tuple[str, ...]):
        """The viewer's one call into the query engine."""
        options = QueryOptions(method="relevancy", negatives=negatives) if negatives else QueryOptions()
        return self.engine.answer(phrase, options=options)

    def ask(self, phrase: str, negatives: str = ""):
        """Answer `phrase` (against the comma-separated `negatives`, if any) and show it; the answer, or None with
        the reason in the message panel."""
        with self._lock:
            try:
                answer = self._query(phrase, tuple(n.strip() for n in negatives.split(",") if n.strip()))
            except M3Error as exc:
                self.answer = None
                self.message.content = f"**No answer:** {exc}"
                self._clear_answer()
                self._paint()
                return None
            self.answer = answer
            self.threshold.value = float(np.clip(answer.threshold, 0.0, 1.0))   # repaints through on_update
            self._paint()
            self._show(answer)
            return answer

    def _paint(self) -> None:
        """(Re)send the splats: the scene's colours, or while an answer is shown the matches in HIGHLIGHT_RGB."""
        with self._lock:
            colours = self.colours
            if self.answer is not None:
                match = self.answer.gaussian_scores > self.threshold.value
                colours = colours * DIMMING
                colours[match] = np.asarray(HIGHLIGHT_RGB) / 255
            self.server.scene.add_gaussian_splats("/memory", centers=self.centres, covariances=self.covariances,
                                                  rgbs=colours, opacities=self.opacities)

    def _clear_answer(self) -> None:
        self.server.scene.remove_by_name("/answer")
        self.instance_list.content = ""
        self.heatmap.visible = False

    def _show(self, answer) -> None:
        from viser.transforms import SO3

        scene = self.server.scene
        self._clear_answer()
        scene.add_frame("/answer", show_axes=False)
        for i, instance in enumerate(answer.instances):
            scene.add_box(f"/answer/instance_{i}", color=HIGHLIGHT_RGB, dimensions=np.maximum(instance.extent, 0.01),
                          wireframe=True, position=instance.point)
        scene.add_icosphere("/answer/target", radius=0.012, color=TARGET_RGB, position=answer.point)
        scene.add_frame("/answer/grasp", axes_length=0.08, axes_radius=0.004, wxyz=SO3.from_matrix(answer.grasp[:3, :3]).wxyz,
                        position=answer.grasp[:3, 3])
        self.message.content = (f"**{answer.query}** at ({', '.join(f'{v:.3f}' for v in answer.point)}) "
                                f"{self.memory.world_frame}, score {answer.score:.2f}; heatmap from "
                                f"{answer.heatmap_source}. " + " ".join(answer.notes))
        self.instance_list.content = "\n".join(
            f"{i + 1}. ({', '.join(f'{v:.3f}' for v in inst.point)}), extent "
            f"{' × '.join(f'{100 * v:.0f}' for v in inst.extent)} cm, score {inst.score:.2f}, "
            f"seen by {inst.views_seen} views" for i, inst in enumerate(answer.instances))
        if answer.heatmap is not None:
            rgb = self.memory.render(answer.heatmap_camera).rgb
            self.heatmap.image = overlay(rgb, answer.heatmap, answer.mask)
            self.heatmap.visible = True

    def close(self) -> None:
        self.server.stop()
