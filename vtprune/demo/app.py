"""The Gradio app of ``vtprune demo``: ask about an image, see the pruned answer beside the unpruned one.

    from vtprune.demo import DemoEngine, build_demo
    app = build_demo(DemoEngine(model, processor))   # any supported model; loading is the caller's
    app.launch()

The UI only wires widgets to `DemoEngine.ask`. One named endpoint, ``/ask`` (image, question, method,
keep, heatmap) -> (pruned answer, unpruned answer, overlay, summary), serves the button and clients
(``gradio_client``). Requests queue one at a time. Bad input shows a message (``gr.Error``), never a
stack trace.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from vtprune.demo.engine import DemoEngine, DemoInputError

TITLE = "vtprune: what visual-token pruning keeps"


def example_rows(n: int = 4, directory: str | Path | None = None) -> list[list]:
    """``n`` examples from the toy shapes task's test split: ``[image path, question]`` rows, the images
    written as PNG files into ``directory`` (a new temporary one by default)."""
    from vtprune.eval.tasks import ONE_WORD
    from vtprune.toy import shapes

    where = Path(directory or tempfile.mkdtemp(prefix="vtprune-demo-"))
    where.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        sample = shapes.make_sample("test", i)
        path = where / f"shapes-test-{i}.png"
        sample.image.save(path)
        rows.append([str(path), f"{sample.question} {ONE_WORD}"])
    return rows


def default_method(methods: list[str]) -> str:
    return "fastv" if "fastv" in methods else methods[0]


def build_demo(engine: DemoEngine, *, examples: list[list] | None = None, default_keep: str = "0.11"):
    """The ``gr.Blocks`` app for ``engine`` (not launched). ``examples``: ``[image path, question]`` rows
    (default: four toy-shapes scenes)."""
    import gradio as gr

    methods = engine.methods()
    if not methods:
        raise ValueError(f"no pruning method configures on {engine.name}: nothing to demonstrate")

    def ask(image, question, method, keep, heatmap):
        try:
            ans = engine.ask(image, question, method, keep, bool(heatmap))
        except DemoInputError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # the model failed on this input: say so in the UI, keep serving
            raise gr.Error(f"the model failed on this request ({type(err).__name__}: {err})",
                           print_exception=False) from None
        return ans.pruned, ans.unpruned, ans.overlay, ans.summary()

    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"## {TITLE}\nModel: `{engine.name}`. Upload an image, ask a question, choose a pruning "
                    "method and a budget (a token count such as `7`, or a fraction such as `0.25`).")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], elem_id="image")
                question = gr.Textbox(label="Question", placeholder="What colour is the circle?", elem_id="question")
                with gr.Row():
                    method = gr.Dropdown(methods, value=default_method(methods), label="Method", elem_id="method",
                                         allow_custom_value=True)  # compositions: debias+fastv, ...
                    keep = gr.Textbox(value=default_keep, label="Visual tokens to keep (count or fraction)",
                                      elem_id="keep")
                heatmap = gr.Checkbox(value=False, label="Show score heatmap", elem_id="heatmap")
                button = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                with gr.Row():
                    pruned = gr.Textbox(label="Pruned answer", interactive=False, elem_id="pruned-answer")
                    unpruned = gr.Textbox(label="Unpruned answer", interactive=False, elem_id="unpruned-answer")
                overlay = gr.Image(type="pil", label="Kept tokens (bright) and pruned (dark)", interactive=False,
                                   elem_id="overlay")
                info = gr.Markdown(elem_id="info")
        rows = examples if examples is not None else example_rows()
        if rows:
            gr.Examples(rows, inputs=[image, question], label="Examples from the toy shapes task")
        inputs = [image, question, method, keep, heatmap]
        button.click(ask, inputs=inputs, outputs=[pruned, unpruned, overlay, info], api_name="ask")
    app.queue(default_concurrency_limit=1, max_size=32)
    return app
