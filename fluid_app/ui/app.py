"""The ``gr.Blocks`` page: live parallel denoising, replay, and a race against greedy AR.

Every handler is a generator that streams the sampler's events into the page, so the Gradio
queue keeps each user's stream separate and the Stop button cancels between two forwards.
Bad input becomes a one-line message in the status box (and a ``gr.Error`` toast), never a
stack trace.

Sampling: the Temperature, Top-p, Top-k and Seed controls go to the library unchanged (0 is
greedy). A run without a seed gets a fresh one drawn here, shown in the status line and the
result, so any sampled decode can be repeated; a race gives AR and FLUID the same seed.

Exposure: the page serves an allow-list of models (:class:`~fluid_app.ui.runner.ModelChoices`,
the launched model plus ``allow_models``) in a drop-down; a free-text model choice
(``allow_any_model``) would let any visitor load any file the server can read, so it is only
served on a loopback address without a share link (:func:`check_exposure`). ``auth`` turns on
Gradio's own login.
"""

from __future__ import annotations

import secrets
import sys
import time
from typing import Any, Iterator, Sequence

from backends import BACKENDS

from ..api import check_prompt
from ..errors import FluidError, phrase
from ..exposure import check_exposure
from ..fluid_config import FluidConfig
from ..sampler import MODES, DecodeSettings
from .chat import Conversation, Turn, messages, reply_stats, token_pieces, transcript_html, with_reply
from .gradio_loader import import_gradio
from .render import LiveView, legend_html, plot_data, race_summary, sampling_text, slots_html, stats_text
from .runner import Activity, ModelCache, ModelChoices, Run, TokenText, race, verdict, warm_up

gr = import_gradio()

UPDATE_INTERVAL_S = 0.05  # at most ~20 page updates a second (more is invisible and costly)
PLOT_INTERVAL_S = 0.5  # the plot redraws less often than the slots
EXAMPLES = ["Tell me about the Moon.", "Write a haiku about fast decoding.",
            "List the first ten prime numbers."]


# The race's two block views keep one height, so the text boxes under them line up.
#
# The Live and Race tabs share one prompt row above the tabs; the Chat tab has its own box. The
# row hides while the Chat panel shows, in CSS on the panel's own state: a tab-select event would
# need a round trip to the server, and a click made while the page still loads (or the server is
# busy) left the row hidden on the Live tab.
PAGE_CSS = """.fluid-race-live {height: 11em; overflow-y: auto}
.gradio-container:has(#fluid-chat-tab:not([style*="display: none"])) #fluid-prompt-row {display: none !important}"""


def _fail(message: str) -> gr.Error:
    """The toast for a user's mistake. The server console gets one line, not a traceback:
    a typo in a box is not a server fault."""
    print(f"user error: {message}", file=sys.stderr, flush=True)
    return gr.Error(message, duration=None, print_exception=False)


# How the page names the options a library error points at (the CLI names its flags).
CONTROLS = {"prompt": "the Prompt box", "k_min": "the k_min slider", "k_max": "the k_max slider",
            "threshold": "the Threshold slider", "max_new_tokens": "the Max new tokens slider",
            "mode": "the Mode choice", "chat": "the Chat box", "model": "the Model list",
            "backend": "the Backend box", "mask_token_id": "the model's fluid_config.json",
            "prompt_lookup_num_tokens": "the model's fluid_config.json",
            "temperature": "the Temperature slider", "top_p": "the Top-p slider", "top_k": "the Top-k box",
            "seed": "the Seed box"}
CHAT_CONTROLS = {"prompt": "the Message box", "messages": "the Message box"}
RANDOM_SEED = -1  # the Seed box's "draw a new seed every run" (an empty box means the same)


def named_slider(*args: Any, **kwargs: Any) -> gr.Slider:
    """A ``gr.Slider`` whose out-of-range error names it.

    Gradio checks a slider's bounds before any handler runs, in words that do not say which
    control is at fault ("Value -1 is less than minimum value 0."), so an API caller sending
    temperature -1 would not know which argument to fix. The check is wrapped on this one
    instance: a subclass of a Gradio component would make Gradio write a ``.pyi`` stub next
    to this file at import (and fail to import where the package is read-only).
    """
    slider = gr.Slider(*args, **kwargs)
    check = slider.preprocess

    def preprocess(payload: float) -> float:
        try:
            return check(payload)
        except gr.Error:
            raise _fail(f"{slider.label} {payload:g} is out of range; pick a value from {slider.minimum:g} to "
                        f"{slider.maximum:g} (the {slider.label} slider)") from None

    slider.preprocess = preprocess  # type: ignore[method-assign]
    return slider


def quiet_refusals(component: Any) -> Any:
    """Make Gradio's own refusal of a value (a drop-down value not in its list) a one-line
    user error instead of a traceback in the server console; the words stay Gradio's."""
    check = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return check(payload)
        except gr.Error as exc:
            raise _fail(str(exc.message)) from None

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def _clean_error(exc: Exception, names: dict[str, str] | None = None) -> str:
    """One line for the page; ``names`` renames controls for one tab (the Chat tab's Message box)."""
    if isinstance(exc, FluidError):
        return phrase(exc, {**CONTROLS, **(names or {})})
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def _sampling(temperature: float, top_p: float, top_k: float | None, seed: float | None) -> dict[str, Any]:
    """The sampling options of a decode, as the library names them. An empty Seed box (or -1)
    means a fresh seed every run: drawn here when sampling, so it can be shown and reused."""
    options: dict[str, Any] = {"temperature": float(temperature), "top_p": float(top_p),
                               "top_k": 0 if top_k is None else _whole(top_k), "seed": None}
    if seed is not None and seed != RANDOM_SEED:
        options["seed"] = _whole(seed)
    elif options["temperature"] > 0:
        options["seed"] = secrets.randbelow(2**31)
    return options


def _whole(value: float) -> int | float:
    """``value`` as an int when it is a whole number; otherwise unchanged, for the library to refuse."""
    return int(value) if float(value).is_integer() else value


def _check_input(prompt: str, k_min: float, k_max: float, mode: str = "fluid", **sampling: Any) -> None:
    """Checks that need no model, so the user hears about them before a model loads."""
    check_prompt(prompt or "")
    DecodeSettings.from_config(None, mode=mode, k_min=int(k_min), k_max=int(k_max), **sampling)


def slider_defaults(config: FluidConfig) -> dict[str, Any]:
    """The FLUID sliders' starting values: a checkpoint's own decoding defaults (the demo shows
    what the model was exported to do), plus its sampling ``k_min`` for the Temperature rule."""
    return {"threshold": config.threshold, "k_min": config.k_min, "k_max": config.k_max,
            "sampling_k_min": config.sampling_k_min}


class DemoApp:
    """Builds the page around a :class:`ModelCache`; ``models`` (default: ``default_model``
    alone) are the models a visitor may pick, ``default_model`` first."""

    def __init__(self, cache: ModelCache, default_model: str = "default", default_backend: str = "auto",
                 defaults: dict[str, Any] | None = None, concurrency: int = 1,
                 models: ModelChoices | None = None):
        self.cache = cache
        self.models = models or ModelChoices([default_model])
        self.default_backend = default_backend
        self.defaults = {**slider_defaults(FluidConfig()), **(defaults or {})}
        self.concurrency = concurrency
        self.activity = Activity()

    # -- handlers --------------------------------------------------------------------------
    def _load(self, model: str, backend: str):
        reference = self.models.check(model)  # before anything touches the disk
        try:
            return self.cache.get(reference, backend)
        except FluidError:
            raise
        except Exception as exc:  # a broken folder, an unreadable file: say it in one line
            raise FluidError(f"cannot load model {reference!r}: {_clean_error(exc)}") from None

    def _busy(self, status: str) -> str:
        """The status line, saying so when other visitors' decodes share the machine."""
        others = self.activity.running - 1
        return status + (f" (sharing the machine with {others} other decode{'s' * (others > 1)})"
                         if others > 0 else "")

    def generate(self, prompt: str, model: str, backend: str, chat: bool, mode: str, max_new_tokens: float,
                 threshold: float, k_min: float, k_max: float, slow_ms: float, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: float | None = 0, seed: float | None = RANDOM_SEED) -> Iterator[tuple]:
        """Stream one decode: status, slots, committed text, plot, stats, result, replay slider, state.

        The sampling parameters come last, with defaults, so API callers written before they
        existed keep working (and decode greedily, as then).
        """
        skip = gr.skip()
        try:
            sampling = _sampling(temperature, top_p, top_k, seed)
            _check_input(prompt, k_min, k_max, mode, **sampling)
            yield ("loading model…", skip, "", None, "", None, gr.Slider(value=0, maximum=1), None)
            loaded, lock = self._load(model, backend)
            run = Run.start(loaded, lock, prompt, bool(chat), mode, max_new_tokens=int(max_new_tokens),
                            threshold=float(threshold), k_min=int(k_min), k_max=int(k_max), **sampling)
        except FluidError as exc:
            yield (f"error: {_clean_error(exc)}",) + (skip,) * 7
            raise _fail(_clean_error(exc)) from None
        with self.activity:
            yield from self._watch(run, loaded, mode, float(slow_ms), {"model": model, "backend": backend})

    def _watch(self, run: Run, loaded: Any, mode: str, slow_ms: float, source: dict[str, str]) -> Iterator[tuple]:
        """The decode loop of :meth:`generate`, page updates throttled."""
        skip = gr.skip()
        token_text = TokenText(loaded.tokenizer)
        view = run.view
        sampling = run.sampling
        status = (f"decoding with {mode} on {loaded.backend.name} ({getattr(loaded.backend, 'device', '')}), "
                  f"{sampling_text(sampling)}")
        last_update = last_plot = 0.0
        while not run.done:
            try:
                run.step()
            except FluidError as exc:
                yield (f"error: {_clean_error(exc)}",) + (skip,) * 7
                raise _fail(_clean_error(exc)) from None
            now = time.perf_counter()
            if run.done or not view.frames:
                continue
            if slow_ms > 0:
                time.sleep(slow_ms / 1000.0)
            elif now - last_update < UPDATE_INTERVAL_S and view.committed:
                continue
            last_update = now
            plot = skip
            if view.points and now - last_plot >= PLOT_INTERVAL_S:  # an empty first frame breaks the chart
                plot, last_plot = plot_data(view.points), now
            yield (self._busy(status), slots_html(view.frames[-1], token_text, view.horizons),
                   loaded.decode(view.committed), plot, stats_text(view, run.busy), skip, skip, skip)
        result = run.generation.to_dict()
        result["seconds_compute"] = round(run.busy, 4)
        if sampling:
            result["sampling"] = sampling  # with the seed drawn for an empty Seed box: enough to repeat it
        replay = {**source, "view": view}  # gr.State lives on the server: the visitor never sees it
        frames = len(view.frames)
        yield (f"done: {stats_text(view, run.busy)} · {sampling_text(sampling)}",
               slots_html(view.frames[-1], token_text, view.horizons),
               run.generation.text, plot_data(view.points), stats_text(view, run.busy), result,
               gr.Slider(minimum=0, maximum=max(frames - 1, 1), value=frames - 1, step=1, interactive=True),
               replay)

    def k_min_for(self, temperature: float, k_min: float) -> float:
        """The k_min slider's value after the Temperature slider moved: when the temperature
        crosses 0, a slider still at the checkpoint's default for one kind of decoding moves to
        its default for the other (``sampling_k_min``, see FluidConfig); a value the visitor
        chose stays."""
        greedy = self.defaults["k_min"]
        sampled = self.defaults.get("sampling_k_min") or greedy
        if temperature and temperature > 0 and k_min == greedy:
            return sampled
        if not temperature and k_min == sampled:
            return greedy
        return k_min

    def replay(self, index: float, replay: dict | None) -> tuple:
        """Redraw a finished decode as it was at frame ``index``."""
        if not replay:
            return gr.skip(), gr.skip(), gr.skip()
        view: LiveView = replay["view"]
        frame = view.frames[max(0, min(int(index), len(view.frames) - 1))]
        loaded, _ = self._load(replay["model"], replay["backend"])
        html = slots_html(frame, TokenText(loaded.tokenizer), view.horizons,
                          title=f"replay: frame {int(index) + 1} of {len(view.frames)}")
        return html, loaded.decode(view.committed[: frame.committed]), plot_data(view.points[: frame.points])

    def race(self, prompt: str, model: str, backend: str, chat: bool, max_new_tokens: float,
             threshold: float, k_min: float, k_max: float, temperature: float = 0.0, top_p: float = 1.0,
             top_k: float | None = 0, seed: float | None = RANDOM_SEED) -> Iterator[tuple]:
        """AR and FLUID on the same prompt, interleaved (see :mod:`fluid_app.ui.runner`), with
        the same seed when sampling (sampling parameters last, as in :meth:`generate`)."""
        skip = gr.skip()
        outputs = 8
        try:
            sampling = _sampling(temperature, top_p, top_k, seed)  # one seed, drawn once, for both
            _check_input(prompt, k_min, k_max, "fluid", **sampling)
            yield ("loading model…",) + (skip,) * (outputs - 1)
            loaded, lock = self._load(model, backend)
            options = dict(max_new_tokens=int(max_new_tokens), threshold=float(threshold),
                           k_min=int(k_min), k_max=int(k_max), **sampling)
            ar = Run.start(loaded, lock, prompt, bool(chat), "ar", **options)
            fluid = Run.start(loaded, lock, prompt, bool(chat), "fluid", **options)
        except FluidError as exc:
            yield (f"error: {_clean_error(exc)}",) + (skip,) * (outputs - 1)
            raise _fail(_clean_error(exc)) from None
        with self.activity:
            yield from self._race(ar, fluid, loaded)

    def _race(self, ar: Run, fluid: Run, loaded: Any) -> Iterator[tuple]:
        """The stepping loop of :meth:`race`, page updates throttled."""
        skip = gr.skip()
        token_text = TokenText(loaded.tokenizer)
        last_update = 0.0

        def panels() -> tuple:
            return (slots_html(ar.view.frames[-1] if ar.view.frames else None, token_text, ar.view.horizons),
                    loaded.decode(ar.view.committed), stats_text(ar.view, ar.busy),
                    slots_html(fluid.view.frames[-1] if fluid.view.frames else None, token_text,
                               fluid.view.horizons),
                    loaded.decode(fluid.view.committed), stats_text(fluid.view, fluid.busy))

        status = ("racing: AR and FLUID interleaved on one thread, each step given to the one behind in compute time, "
                  + sampling_text(fluid.sampling))
        for _ in race(ar, fluid):
            now = time.perf_counter()
            if now - last_update >= UPDATE_INTERVAL_S:
                last_update = now
                yield (self._busy(status),) + panels() + (skip,)
        yield ("done",) + panels() + (race_summary(verdict(ar, fluid)),)

    # -- chat ----------------------------------------------------------------------------------
    def chat(self, message: str, conversation: Conversation | None, system: str, model: str, backend: str,
             max_new_tokens: float, threshold: float, k_min: float, k_max: float, slow_ms: float = 0,
             temperature: float = 0.0, top_p: float = 1.0, top_k: float | None = 0,
             seed: float | None = RANDOM_SEED) -> Iterator[tuple]:
        """One chat turn: the history through the chat template, the reply streamed into the
        transcript as blocks commit, the block being decoded beside it.

        Outputs: transcript, block view, conversation state, message box, status. The model's
        prompt cache keeps the conversation's KV cache, so a turn prefills only what is new."""
        skip = gr.skip()
        conversation = Conversation([t if t.state != "decoding" else with_reply(t, t.reply, t.pieces, t.stats,
                                                                                  "stopped")
                                     for t in (conversation.turns if conversation else [])])
        try:
            sampling = _sampling(temperature, top_p, top_k, seed)
            _check_input(message, k_min, k_max, "fluid", **sampling)
            loaded, lock = self._load(model, backend)
            ids = loaded.encode_chat(messages(system or "", conversation.turns, message))
            run = Run.start(loaded, lock, ids, False, "fluid", prompt_cache=loaded.prompt_cache,
                            max_new_tokens=int(max_new_tokens), threshold=float(threshold), k_min=int(k_min),
                            k_max=int(k_max), **sampling)
        except FluidError as exc:
            message = _clean_error(exc, CHAT_CONTROLS)
            yield (skip, skip, skip, skip, f"error: {message}")
            raise _fail(message) from None
        reused = loaded.prompt_cache
        conversation.turns.append(Turn(message))
        yield (transcript_html(conversation), slots_html(None, str), conversation.copy(), "",
               f"decoding a reply to {len(ids)} prompt tokens, {sampling_text(run.sampling)}")
        with self.activity:
            yield from self._chat_watch(run, loaded, conversation, float(slow_ms), reused)

    def _chat_watch(self, run: Run, loaded: Any, conversation: Conversation, slow_ms: float,
                    cache: Any) -> Iterator[tuple]:
        """The decode loop of :meth:`chat`, page updates throttled; the state is a fresh copy
        at every update, so a Stop keeps exactly the partial reply on screen."""
        skip = gr.skip()
        token_text = TokenText(loaded.tokenizer)
        view = run.view
        pieces: tuple = ()
        status = ""
        last_update = 0.0

        def update(state: str) -> tuple:
            nonlocal pieces
            pieces = token_pieces(loaded.decode, view.committed, view.sources, pieces)
            stats = reply_stats(len(view.committed), view.forwards, run.busy)
            conversation.turns[-1] = with_reply(conversation.turns[-1], loaded.decode(view.committed), pieces,
                                                stats, state)
            frame = view.frames[-1] if view.frames else None
            return (transcript_html(conversation), slots_html(frame, token_text, view.horizons),
                    conversation.copy(), skip)

        while not run.done:
            try:
                run.step()
            except FluidError as exc:
                yield (skip, skip, skip, skip, f"error: {_clean_error(exc)}")
                raise _fail(_clean_error(exc)) from None
            if not status:  # the first step prefilled: the cache has said how much it reused
                status = (f"decoding: {cache.reused} prompt tokens reused from this conversation's cache, "
                          f"{cache.prefilled} prefilled; {sampling_text(run.sampling)}")
            now = time.perf_counter()
            if run.done or not view.frames:
                continue
            if slow_ms > 0:
                time.sleep(slow_ms / 1000.0)
            elif now - last_update < UPDATE_INTERVAL_S:
                continue
            last_update = now
            yield update("decoding") + (self._busy(status),)
        yield update("done") + (f"done: {conversation.turns[-1].stats}; {status.removeprefix('decoding: ')}",)

    def retry(self, conversation: Conversation | None, *args: Any) -> Iterator[tuple]:
        """Regenerate the last reply: the last user message again, on the history before it."""
        if not conversation or not conversation.turns:
            yield (gr.skip(),) * 4 + ("error: there is no reply to retry yet",)
            raise _fail("there is no reply to retry yet; send a message first")
        last = conversation.turns[-1]
        yield from self.chat(last.user, Conversation(conversation.turns[:-1]), *args)

    @staticmethod
    def stopped_chat(conversation: Conversation | None) -> tuple:
        """Stop: the reply keeps what was shown, marked stopped (the next turn continues from it)."""
        if not conversation or not conversation.turns:
            return gr.skip(), gr.skip(), "stopped"
        turns = [t if t.state != "decoding" else with_reply(t, t.reply, t.pieces, t.stats, "stopped")
                 for t in conversation.turns]
        conversation = Conversation(turns)
        return transcript_html(conversation), conversation, "stopped"

    # -- page ------------------------------------------------------------------------------
    def _model_control(self) -> gr.Dropdown:
        """The Model list. With an allow-list it is read-only, and Gradio itself turns away a
        value sent to the API that is not listed, before any handler runs and with the same
        words for every such value (:meth:`_load` checks again, for the replay and in case);
        with ``allow_any`` it also takes typed text."""
        if self.models.allow_any:
            return gr.Dropdown(self.models.names, value=self.models.default, allow_custom_value=True,
                               filterable=True, elem_id="fluid-model",
                               label="Model (pick, or type 'default', a folder on this machine or a cached Hub id)")
        return quiet_refusals(gr.Dropdown(self.models.names, value=self.models.default, allow_custom_value=False,
                                          filterable=False, elem_id="fluid-model",
                                          label="Model (the models this demo serves)"))

    def build(self) -> gr.Blocks:
        d = self.defaults
        with gr.Blocks(title="FLUID demo", analytics_enabled=False) as demo:
            gr.Markdown("# FLUID: lossless parallel decoding, live\n"
                        "Each block of *k* slots starts as masks, is drafted in parallel, and is "
                        "verified against the model's own next-token choice, in fewer forwards: at "
                        "temperature 0 the output is exactly what greedy AR would write; above 0 it "
                        "follows the model's sampling distribution exactly (not AR's draws token for token).")
            with gr.Row(elem_id="fluid-prompt-row"):  # the Live and Race tabs' prompt (PAGE_CSS hides it on Chat)
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", lines=3, value=EXAMPLES[0], elem_id="fluid-prompt")
                    gr.Examples(EXAMPLES, inputs=prompt)
                with gr.Column(scale=1):
                    chat = gr.Checkbox(label="Chat (wrap in the chat template)", value=True)
            with gr.Row():
                max_new = named_slider(1, 1024, value=DecodeSettings.max_new_tokens, step=1,
                                      label="Max new tokens", elem_id="fluid-max-new")
                slow = named_slider(0, 1000, value=0, step=10, label="Slow motion (ms per view update)",
                                   elem_id="fluid-slow")
            with gr.Accordion("Model and sampler settings", open=False):
                with gr.Row():
                    model = self._model_control()
                    backend = gr.Dropdown(list(BACKENDS), value=self.default_backend, label="Backend")
                with gr.Row():
                    threshold = named_slider(0.05, 1.0, value=d["threshold"], step=0.01, label="Threshold")
                    k_min = named_slider(1, 64, value=d["k_min"], step=1, label="k_min", elem_id="fluid-kmin")
                    k_max = named_slider(1, 64, value=d["k_max"], step=1, label="k_max", elem_id="fluid-kmax")
                with gr.Row():
                    temperature = named_slider(0, 2, value=DecodeSettings.temperature, step=0.05, label="Temperature",
                                              info="0: greedy (AR's exact text); above 0: sample",
                                              elem_id="fluid-temperature")
                    top_p = named_slider(0.01, 1, value=DecodeSettings.top_p, step=0.01, label="Top-p",
                                        info="nucleus filter when sampling; 1: off", elem_id="fluid-top-p")
                    top_k = gr.Number(value=DecodeSettings.top_k, precision=0, label="Top-k",
                                      info="keep the k likeliest tokens when sampling; 0: off", elem_id="fluid-top-k")
                    seed = gr.Number(value=RANDOM_SEED, precision=0, label="Seed",
                                     info="same seed, same text; -1 or empty: a new one each run",
                                     elem_id="fluid-seed")
            status = gr.Textbox(label="Status", interactive=False, elem_id="fluid-status")
            with gr.Tabs():
                with gr.Tab("Chat", elem_id="fluid-chat-tab"):
                    with gr.Row():
                        with gr.Column(scale=3):
                            transcript = gr.HTML(transcript_html(Conversation()), elem_id="fluid-chat")
                            message = gr.Textbox(label="Message", lines=2, elem_id="fluid-chat-message",
                                                 placeholder="Type a message; Enter sends, Shift+Enter a new line")
                            with gr.Row():
                                send = gr.Button("Send", variant="primary", elem_id="fluid-chat-send")
                                chat_stop = gr.Button("Stop", variant="stop", elem_id="fluid-chat-stop")
                                retry = gr.Button("Retry", elem_id="fluid-chat-retry")
                                clear = gr.Button("Clear", elem_id="fluid-chat-clear")
                            system = gr.Textbox(label="System prompt (optional)", lines=1,
                                                elem_id="fluid-chat-system")
                        with gr.Column(scale=2):
                            gr.HTML(legend_html())
                            chat_live = gr.HTML(slots_html(None, str), elem_id="fluid-chat-live")
                    conversation = gr.State(Conversation())
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
                                           x_title="forward", y_title="tokens per forward, k", color_title="",
                                           elem_id="fluid-plot")
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
                            ar_html = gr.HTML(slots_html(None, str, title="AR"), elem_id="fluid-ar-live",
                                              elem_classes="fluid-race-live")
                            ar_text = gr.Textbox(label="AR text", lines=6, interactive=False, elem_id="fluid-ar-text")
                            ar_stats = gr.Textbox(label="AR", interactive=False)
                        with gr.Column():
                            fl_html = gr.HTML(slots_html(None, str, title="FLUID"), elem_id="fluid-fl-live",
                                              elem_classes="fluid-race-live")
                            fl_text = gr.Textbox(label="FLUID text", lines=6, interactive=False,
                                                 elem_id="fluid-fl-text")
                            fl_stats = gr.Textbox(label="FLUID", interactive=False)

            gen_event = go.click(
                self.generate, [prompt, model, backend, chat, mode, max_new, threshold, k_min, k_max, slow,
                                temperature, top_p, top_k, seed],
                [status, live, text, plot, stats, result, replay_at, replay_state], api_name="generate",
                concurrency_id="decode", concurrency_limit=self.concurrency, show_progress="hidden")
            temperature.input(self.k_min_for, [temperature, k_min], k_min, api_name=False, queue=False,
                              show_progress="hidden")
            replay_at.input(self.replay, [replay_at, replay_state], [live, text, plot], api_name=False,
                            show_progress="hidden")
            race_event = race_go.click(
                self.race, [prompt, model, backend, chat, max_new, threshold, k_min, k_max,
                            temperature, top_p, top_k, seed],
                [status, ar_html, ar_text, ar_stats, fl_html, fl_text, fl_stats, summary], api_name="race",
                concurrency_id="decode", concurrency_limit=self.concurrency, show_progress="hidden")
            stop.click(stopped_stats, stats, [status, stats], cancels=[gen_event], api_name=False, queue=False)
            race_stop.click(lambda: "stopped", None, status, cancels=[race_event], api_name=False, queue=False)
            chat_inputs = [system, model, backend, max_new, threshold, k_min, k_max, slow, temperature, top_p, top_k,
                           seed]
            chat_outputs = [transcript, chat_live, conversation, message, status]
            chat_events = [
                trigger(self.chat, [message, conversation, *chat_inputs], chat_outputs, api_name=name,
                        concurrency_id="decode", concurrency_limit=self.concurrency, show_progress="hidden")
                for trigger, name in ((send.click, "chat"), (message.submit, False))]
            chat_events.append(retry.click(self.retry, [conversation, *chat_inputs], chat_outputs, api_name=False,
                                           concurrency_id="decode", concurrency_limit=self.concurrency,
                                           show_progress="hidden"))
            chat_stop.click(self.stopped_chat, conversation, [transcript, conversation, status], cancels=chat_events,
                            api_name=False, queue=False)
            clear.click(lambda: (transcript_html(Conversation()), slots_html(None, str), Conversation(), "", ""),
                        None, chat_outputs, cancels=chat_events, api_name=False, queue=False)
        demo.queue(default_concurrency_limit=self.concurrency)
        return demo


def stopped_stats(stats: str) -> tuple[str, str]:
    """Stop on the Live tab: the status says so, and so does the Stats box (not "running")."""
    return "stopped", ("stopped" + stats[len("running"):]) if (stats or "").startswith("running") else stats


def theme() -> gr.themes.Base:
    """System fonts only: the demo must render offline (no web-font downloads)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(model: str = "default", backend: str = "auto", host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, concurrency: int = 1, block: bool = True, preload: bool = True, *,
           allow_models: Sequence[str] = (), allow_any_model: bool = False,
           auth: Sequence[tuple[str, str]] | None = None, max_models: int = 3):
    """Load ``model`` (so a bad ``--model`` fails before the server starts) and serve the page.

    Visitors may pick ``model`` and the ``allow_models`` (checked here, so a typo fails now),
    or with ``allow_any_model`` name any model (loopback only, see :func:`check_exposure`).
    ``auth`` is a list of ``(user, password)`` for Gradio's login page.
    Returns ``(blocks, url)``; with ``block=False`` the server runs in a background thread.
    """
    check_exposure(host, share, allow_any_model)
    models = ModelChoices([model, *allow_models], allow_any=allow_any_model)
    cache = ModelCache(max_models=max_models)
    defaults: dict[str, Any] = {}
    if preload:
        from backends import pick_backend

        chosen, reason = pick_backend(backend)
        print(f"backend: {chosen} ({reason}); loading {model!r}…", file=sys.stderr)
        loaded, _ = cache.get(model, backend)
        warm_up(loaded)
        defaults = slider_defaults(loaded.config)
    demo = DemoApp(cache, model, backend, defaults, concurrency, models=models).build()
    _, url, share_url = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                                    theme=theme(), css=PAGE_CSS, ssr_mode=False, quiet=False, show_error=False,
                                    auth=list(auth) if auth else None,
                                    auth_message="Log in with the user name and password this demo was started with."
                                    if auth else None)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo, share_url or url
