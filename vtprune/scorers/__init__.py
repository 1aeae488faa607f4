"""Scorers rank visual tokens; each registers itself by name (`vtprune.methods()` lists them)."""

from vtprune.scorers import (  # noqa: F401  (registration)
    baselines,
    cdpruner,
    cls,
    compose,
    dart,
    debias,
    diversity,
    dyvte,
    fastv,
    flowcut,
    holov,
    prumerge,
    pyramiddrop,
    sink,
    sparsevlm,
    transprune,
    vflowopt,
    visionzip,
    vispruner,
    vscan,
    zoo,
)
from vtprune.scorers.base import (
    HIDDEN_STATES,
    IN_LLM,
    LLM_ATTENTION,
    PIXEL_VALUES,
    PRE_LLM,
    SIGNALS,
    VISION_CLS_ATTENTION,
    VISION_FEATURES,
    Scorer,
    Signals,
    register,
    registry,
)
from vtprune.scorers.compose import Ensemble, Wrapper, build_scorer, method_string
from vtprune.scorers.select import image_budget, select_topk

# Short names for the object form: vtprune.apply(model, Debias(Sink(FastV())), keep=64)
FastV = fastv.FastVScorer
CLS = cls.CLSScorer
VTCCLS = cls.VTCCLSScorer
VisionZip = visionzip.VisionZipScorer
FlowCut = flowcut.FlowCutScorer
Random = baselines.RandomScorer
Uniform = baselines.UniformScorer
Debias = debias.Debias
Sink = sink.Sink
DivPrune = diversity.DivPruneScorer
CDPruner = cdpruner.CDPrunerScorer
ZOO = zoo.ZOOScorer
TransPrune = transprune.TransPruneScorer
SparseVLM = sparsevlm.SparseVLMScorer
VFlowOpt = vflowopt.VFlowOptScorer
PyramidDrop = pyramiddrop.PyramidDropScorer
DART = dart.DARTScorer
VisPruner = vispruner.VisPrunerScorer
PruMerge = prumerge.PruMergeScorer
PruMergePlus = prumerge.PruMergePlusScorer
DyVTE = dyvte.DyVTEScorer
HoloV = holov.HoloVScorer
VScan = vscan.VScanScorer

__all__ = [
    "CDPruner",
    "CLS",
    "DART",
    "DyVTE",
    "PruMerge",
    "PruMergePlus",
    "PyramidDrop",
    "VisPruner",
    "VTCCLS",
    "Debias",
    "DivPrune",
    "FastV",
    "HoloV",
    "FlowCut",
    "Random",
    "Sink",
    "SparseVLM",
    "TransPrune",
    "Uniform",
    "VFlowOpt",
    "VisionZip",
    "VScan",
    "ZOO",
    "HIDDEN_STATES",
    "IN_LLM",
    "LLM_ATTENTION",
    "PIXEL_VALUES",
    "PRE_LLM",
    "SIGNALS",
    "VISION_CLS_ATTENTION",
    "VISION_FEATURES",
    "Wrapper",
    "Ensemble",
    "Scorer",
    "Signals",
    "build_scorer",
    "image_budget",
    "method_string",
    "register",
    "registry",
    "select_topk",
]
