"""The built-in evaluation tasks: importing this package registers them with :func:`eval.task.register`.

- :mod:`eval.tasks.shapes`: ``shapes_vqa``, ``geneval``, ``geneval_compositional``.
- :mod:`eval.tasks.visual_tokenizer`: ``tokenizer``, ``zero_shot``.
- :mod:`eval.tasks.standard_benchmarks`: ``vqav2``, ``gqa``, ``pope``, ``mme``, ``mmbench``, ``seed_bench``.
"""

from eval.tasks.shapes import ShapesGenEval, ShapesGenEvalCompositional, ShapesVQA, judge_item
from eval.tasks.standard_benchmarks import GQA, MME, POPE, MMBench, SEEDBench, VQAv2
from eval.tasks.visual_tokenizer import TokenizerMetrics, ZeroShot

__all__ = [
    "GQA",
    "MME",
    "MMBench",
    "POPE",
    "SEEDBench",
    "ShapesGenEval",
    "ShapesGenEvalCompositional",
    "ShapesVQA",
    "TokenizerMetrics",
    "VQAv2",
    "ZeroShot",
    "judge_item",
]
