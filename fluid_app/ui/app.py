"""The ``gr.Blocks`` page: live parallel denoising, replay, and a race against greedy AR.

Every handler is a generator that streams the sampler's events into the page, so the Gradio
queue keeps each user's stream separate and the Stop button cancels between two forwards.
Bad input becomes a one-line message in the status box (and a ``gr.Error`` toast), never a
stack trace.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import gradio as gr

from ..errors import FluidError
from ..sampler import MODES
from .render import LiveView, legend_html, plot_data, slots_html, stats_text
from .runner import ModelCache, Run, TokenText, race, verdict

UPDATE_INTERVAL_S = 0.05  # at most ~20 page updates a second (more is invisible and costly)
PLOT_INTERVAL_S = 0.5  # the plot redraws less often than the slots
EXAMPLES = ["Tell me about the Moon.", "Write a haiku about fast decoding.",
            "List the first ten prime numbers."]


def _fail(message: str) -> gr.Error:
    return gr.Error(message, duration=None)


def _clean_error(exc: Exception) -> str:
    if isinstance(exc, FluidError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def _check_input(prompt: str, k_min: float, k_max: float) -> None:
    """Checks that need no model, so the user hears about them before a model loads."""
    if not (prompt or "").strip():
        raise FluidError("the prompt is empty; type something in the Prompt box")
    if int(k_min) > int(k_max):
        raise FluidError(f"k_min ({int(k_min)}) is larger than k_max ({int(k_max)}); lower k_min or raise k_max")


class DemoApp:
    """Builds the page around a :class:`ModelCache`; ``default_model`` fills the Model box."""

    def __init__(self, cache: ModelCache, default_model: str = "default", default_backend: str = "auto",
                 defaults: dict[str, Any] | None = None, concurrency: int = 1):
        self.cache = cache
        self.default_model = default_model
        self.default_backend = default_backend
        self.defaults = {"threshold": 0.9, "k_min": 4, "k_max": 16, **(defaults or {})}
        self.concurrency = concurrency

    # -- handlers --------------------------------------------------------------------------
    def _load(self, model: str, backend: str):
        try:
            return self.cache.get(model, backend)
        except FluidError:
            raise
        except Exception as exc:  # a broken folder, an unreadable file: say it in one line
            raise FluidError(f"cannot load model {model!r}: {_clean_error(exc)}") from None

    def generate(self, prompt: str, model: str, backend: str, chat: bool, mode: str, max_new_tokens: float,
                 threshold: float, k_min: float, k_max: float, slow_ms: float) -> Iterator[tuple]:
        """Stream one decode: status, slots, committed text, plot, stats, result, replay slider, state."""
        skip = gr.skip()
        try:
            _check_input(prompt, k_min, k_max)
            yield ("loading model…", skip, "", None, "", None, gr.Slider(value=0, maximum=1), None)
            loaded, lock = self._load(model, backend)
            run = Run.start(loaded, lock, prompt, bool(chat), mode, max_new_tokens=int(max_new_tokens),
                            threshold=float(threshold), k_min=int(k_min), k_max=int(k_max))
        except FluidError as exc:
            yield (f"error: {exc}",) + (skip,) * 7
            raise _fail(str(exc)) from None
        token_text = TokenText(loaded.tokenizer)
        view = run.view
        status = f"decoding with {mode} on {loaded.backend.name} ({getattr(loaded.backend, 'device', '')})"
        last_update = last_plot = 0.0
        while not run.done:
            try:
                run.step()
            except FluidError as exc:
                yield (f"error: {exc}",) + (skip,) * 7
                raise _fail(str(exc)) from None
            now = time.perf_counter()
            if run.done or not view.frames:
                continue
            if slow_ms > 0:
                time.sleep(float(slow_ms) / 1000.0)
            elif now - last_update < UPDATE_INTERVAL_S and view.committed:
                continue
            last_update = now
            plot = skip
            if view.points and now - last_plot >= PLOT_INTERVAL_S:  # an empty first frame breaks the chart
                plot, last_plot = plot_data(view.points), now
            yield (status, slots_html(view.frames[-1], token_text, view.horizons),
                   loaded.decode(view.committed), plot, stats_text(view, run.busy), skip, skip, skip)
        result = run.generation.to_dict()
        result["seconds_compute"] = round(run.busy, 4)
        replay = {"key": self.cache.key(model, backend), "view": view}
        frames = len(view.frames)
        yield (f"done: {stats_text(view, run.busy)}", slots_html(view.frames[-1], token_text, view.horizons),
               run.generation.text, plot_data(view.points), stats_text(view, run.busy), result,
               gr.Slider(minimum=0, maximum=max(frames - 1, 1), value=frames - 1, step=1, interactive=True),
               replay)

    def replay(self, index: float, replay: dict | None) -> tuple:
        """Redraw a finished decode as it was at frame ``index``."""
        if not replay:
            return gr.skip(), gr.skip(), gr.skip()
        view: LiveView = replay["view"]
        frame = view.frames[max(0, min(int(index), len(view.frames) - 1))]
        loaded, _ = self.cache.get(*replay["key"])
        html = slots_html(frame, TokenText(loaded.tokenizer), view.horizons,
                          title=f"replay: frame {int(index) + 1} of {len(view.frames)}")
        return html, loaded.decode(view.committed[: frame.committed]), plot_data(view.points[: frame.points])

    def race(self, prompt: str, model: str, backend: str, chat: bool, max_new_tokens: float,
             threshold: float, k_min: float, k_max: float) -> Iterator[tuple]:
        """AR and FLUID on the same prompt, interleaved (see :mod:`fluid_app.ui.runner`)."""
        skip = gr.skip()
        outputs = 8
        try:
            _check_input(prompt, k_min, k_max)
            yield ("loading model…",) + (skip,) * (outputs - 1)
            loaded, lock = self._load(model, backend)
            options = dict(max_new_tokens=int(max_new_tokens), threshold=float(threshold),
                           k_min=int(k_min), k_max=int(k_max))
            ar = Run.start(loaded, lock, prompt, bool(chat), "ar", **options)
            fluid = Run.start(loaded, lock, prompt, bool(chat), "fluid", **options)
        except FluidError as exc:
            yield (f"error: {exc}",) + (skip,) * (outputs - 1)
            raise _fail(str(exc)) from None
        token_text = TokenText(loaded.tokenizer)
        last_update = 0.0

        def panels() -> tuple:
            return (slots_html(ar.view.frames[-1] if ar.view.frames else None, token_text, ar.view.horizons),
                    loaded.decode(ar.view.committed), stats_text(ar.view, ar.busy),
                    slots_html(fluid.view.frames[-1] if fluid.view.frames else None, token_text,
                               fluid.view.horizons),
                    loaded.decode(fluid.view.committed), stats_text(fluid.view, fluid.busy))

        status = "racing: AR and FLUID interleaved on one thread, each step given to the one behind in compute time"
        for _ in race(ar, fluid):
            now = time.perf_counter()
            if now - last_update >= UPDATE_INTERVAL_S:
                last_update = now
                yield (status,) + panels() + (skip,)
        result = verdict(ar, fluid)
        same = "identical outputs (lossless)" if result["identical"] else "outputs DIFFER (not lossless: a bug)"
        summary = (f"**FLUID {result['speedup']:.2f}× AR** ({result['fluid_tokens_per_s']:.1f} vs "
                   f"{result['ar_tokens_per_s']:.1f} tokens/s; {result['fluid_tokens_per_forward']:.2f} vs "
                   f"{result['ar_tokens_per_forward']:.2f} tokens/forward) · {same}")
        yield ("done",) + panels() + (summary,)

    # -- page ------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        d = self.defaults
        with gr.Blocks(title="FLUID demo", analytics_enabled=False) as demo:
            gr.Markdown("# FLUID: lossless parallel decoding, live\n"
                        "Each block of *k* slots starts as masks, is drafted in parallel, and is "
                        "verified against greedy AR: the output is exactly what AR would write, "
                        "in fewer forwards.")
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", lines=3, value=EXAMPLES[0], elem_id="fluid-prompt")
                    gr.Examples(EXAMPLES, inputs=prompt)
                with gr.Column(scale=1):
                    chat = gr.Checkbox(label="Chat (wrap in the chat template)", value=True)
                    max_new = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens", elem_id="fluid-max-new")
                    slow = gr.Slider(0, 1000, value=0, step=10, label="Slow motion (ms per view update)",
                                     elem_id="fluid-slow")
            with gr.Accordion("Model and sampler settings", open=False):
                with gr.Row():
                    model = gr.Textbox(label="Model ('default', a local folder, or a Hub id in the cache)",
                                       value=self.default_model, elem_id="fluid-model")
                    backend = gr.Dropdown(["auto", "torch", "mlx"], value=self.default_backend, label="Backend")
                with gr.Row():
                    threshold = gr.Slider(0.05, 1.0, value=d["threshold"], step=0.01, label="Threshold")
                    k_min = gr.Slider(1, 64, value=d["k_min"], step=1, label="k_min", elem_id="fluid-kmin")
                    k_max = gr.Slider(1, 64, value=d["k_max"], step=1, label="k_max", elem_id="fluid-kmax")
            status = gr.Textbox(label="Status", interactive=False, elem_id="fluid-status")
            with gr.Tabs():
                with gr.Tab("Live"):
                    with gr.Row():
                        mode = gr.Radio(list(MODES)[::-1], value="fluid", label="Mode")
                        go = gr.Button("Generate", variant="primary", elem_id="fluid-generate")
                        stop = gr.Button("Stop", variant="stop", elem_id="fluid-stop")
                    gr.HTML(legend_html())
                    live = gr.HTML(slots_html(None, str), elem_id="fluid-live")
                    text = gr.Textbox(label="Committed text", lines=6, interactive=False, elem_id="fluid-text")
                    with gr.Row():
                        plot = gr.LinePlot(x="forward", y="value", color="series", label="Tokens per forward and k",
                                           x_title="forward", y_title="", height=340)
                        stats = gr.Textbox(label="Stats", interactive=False, elem_id="fluid-stats")
                    with gr.Accordion("Result (as fluid generate --json)", open=False):
                        result = gr.JSON(show_label=False)
                    replay_at = gr.Slider(0, 1, value=0, step=1, label="Replay: step through the finished decode",
                                          interactive=True, elem_id="fluid-replay")
                    replay_state = gr.State(None)
                with gr.Tab("Race vs AR"):
                    with gr.Row():
                        race_go = gr.Button("Race FLUID vs AR", variant="primary", elem_id="fluid-race")
                        race_stop = gr.Button("Stop", variant="stop")
                    summary = gr.Markdown(elem_id="fluid-verdict")
                    with gr.Row():
                        with gr.Column():
                            ar_html = gr.HTML(slots_html(None, str, title="AR"))
                            ar_text = gr.Textbox(label="AR text", lines=6, interactive=False, elem_id="fluid-ar-text")
                            ar_stats = gr.Textbox(label="AR", interactive=False)
                        with gr.Column():
                            fl_html = gr.HTML(slots_html(None, str, title="FLUID"))
                            fl_text = gr.Textbox(label="FLUID text", lines=6, interactive=False,
                                                 elem_id="fluid-fl-text")
                            fl_stats = gr.Textbox(label="FLUID", interactive=False)

            gen_event = go.click(
                self.generate, [prompt, model, backend, chat, mode, max_new, threshold, k_min, k_max, slow],
                [status, live, text, plot, stats, result, replay_at, replay_state], api_name="generate",
                concurrency_id="decode", concurrency_limit=self.concurrency, show_progress="hidden")
            replay_at.input(self.replay, [replay_at, replay_state], [live, text, plot], api_name=False,
                            show_progress="hidden")
            race_event = race_go.click(
                self.race, [prompt, model, backend, chat, max_new, threshold, k_min, k_max],
                [status, ar_html, ar_text, ar_stats, fl_html, fl_text, fl_stats, summary], api_name="race",
                concurrency_id="decode", concurrency_limit=self.concurrency, show_progress="hidden")
            for button in (stop, race_stop):
                button.click(lambda: "stopped", None, status, cancels=[gen_event, race_event], api_name=False,
                             queue=False)
        demo.queue(default_concurrency_limit=self.concurrency)
        return demo


def warm_up(model: Any) -> None:
    """One short FLUID decode at start-up: the first multi-token forward pays one-off setup
    costs (seconds on a CPU) that would otherwise land on the first user and skew a race."""
    try:
        model.generate("Hello", mode="fluid", max_new_tokens=4)
    except FluidError:
        pass  # e.g. no MASK token: the page will say so when a user picks that mode


def theme() -> gr.themes.Base:
    """System fonts only: the demo must render offline (no web-font downloads)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(model: str = "default", backend: str = "auto", host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, concurrency: int = 1, block: bool = True, preload: bool = True):
    """Load ``model`` (so a bad ``--model`` fails before the server starts) and serve the page.

    Returns ``(blocks, url)``; with ``block=False`` the server runs in a background thread.
    """
    import sys

    from backends import pick_backend

    cache = ModelCache()
    defaults: dict[str, Any] = {}
    if preload:
        chosen, reason = pick_backend(backend)
        print(f"backend: {chosen} ({reason}); loading {model!r}…", file=sys.stderr)
        loaded, _ = cache.get(model, backend)
        warm_up(loaded)
        c = loaded.config
        defaults = {"threshold": c.threshold, "k_min": c.k_min, "k_max": c.k_max}
    demo = DemoApp(cache, model, backend, defaults, concurrency).build()
    _, url, share_url = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                                    theme=theme(), ssr_mode=False, quiet=False, show_error=False)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo, share_url or url
