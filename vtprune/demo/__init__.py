"""``vtprune demo``: a Gradio app that shows what pruning keeps (`build_demo`), over a UI-free engine
(`DemoEngine`) that tests drive directly."""

from vtprune.demo.engine import Answer, DemoEngine, DemoInputError, load_image, parse_keep

__all__ = ["Answer", "DemoEngine", "DemoInputError", "build_demo", "load_image", "parse_keep"]


def build_demo(*args, **kwargs):
    """See `vtprune.demo.app.build_demo` (imported lazily: gradio is an optional dependency)."""
    from vtprune.demo.app import build_demo as build

    return build(*args, **kwargs)
