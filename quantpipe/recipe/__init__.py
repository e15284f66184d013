"""The recipe: its schema (schema.py, the single source of truth for a run) and its loader (load.py)."""

from quantpipe.recipe.load import _format, load_recipe, parse_recipe, resolve_paths
from quantpipe.recipe.schema import (
    DTYPES,
    NAME_RE,
    QUALITY_GATES,
    SERVE_GATES,
    BenchSpec,
    CalibrationSpec,
    EvalSpec,
    ExecutionSpec,
    GatesSpec,
    GateThresholds,
    LMEvalSpec,
    ModelSpec,
    OutputSpec,
    Recipe,
    ServeSpec,
    VariantSpec,
    absolute,
)

__all__ = ["DTYPES", "NAME_RE", "QUALITY_GATES", "SERVE_GATES", "BenchSpec", "CalibrationSpec", "EvalSpec",
           "ExecutionSpec", "GateThresholds", "GatesSpec", "LMEvalSpec", "ModelSpec", "OutputSpec", "Recipe",
           "ServeSpec", "VariantSpec",
           "_format", "absolute", "load_recipe", "parse_recipe", "resolve_paths"]
