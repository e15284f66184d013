"""Which (variant, runtime) pairs a run measures: the rows of the matrix, planned before any work.

Each variant is measured in the runtimes `eval.runtimes` names (window eval and lm-eval) and in those
`bench.runtimes` names (speed and memory). A name is `auto` (the format's own runtime; on a GPU the compiled
engine for the formats it loads), `natural` (the format's own runtime) or a registered runtime. Names that
resolve to the same runtime share a row. A runtime that does not load a variant's format measures nothing of it
(the pair is listed as skipped). The first row of a variant carries the variant's name; each further runtime
adds a row `variant@runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantpipe import runtimes
from quantpipe.errors import QuantpipeError
from quantpipe.methods import get_method
from quantpipe.recipe import Recipe, VariantSpec


@dataclass
class RowPlan:
    name: str
    variant: VariantSpec
    format: str
    runtime: str | None  # the resolved runtime (None: nothing measures this variant)
    requested: str  # as the recipe named it
    evaluates: bool = False
    benches: bool = False


@dataclass
class Plan:
    rows: list[RowPlan] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def of(self, variant: str) -> list[RowPlan]:
        return [r for r in self.rows if r.variant.name == variant]


def plan_rows(recipe: Recipe, device: str) -> Plan:
    """The rows of a run on `device`, reference variant first; raises when the reference cannot be scored."""
    plan = Plan()
    evaluates = recipe.eval.enabled or recipe.eval.lm_eval is not None
    ref = recipe.reference
    for v in [ref] + [v for v in recipe.variants if v.name != ref.name]:
        fmt = get_method(v.method).format(v.params)
        rows: dict[str, RowPlan] = {}
        for purpose, names, on in (("eval", recipe.eval.runtimes, evaluates),
                                   ("bench", recipe.bench.runtimes, recipe.bench.enabled)):
            for name in names if on else []:
                spec = runtimes.resolve(name, fmt, device)
                if spec is None:
                    plan.skipped.append({"variant": v.name, "runtime": name, "purpose": purpose,
                                         "reason": f"runtime '{name}' does not load format {fmt}"})
                    continue
                row = rows.get(spec.name)
                if row is None:
                    row_name = v.name if not rows else f"{v.name}@{spec.name}"
                    row = rows[spec.name] = RowPlan(row_name, v, fmt, spec.name, name)
                if purpose == "eval":
                    row.evaluates = True
                else:
                    row.benches = True
        plan.rows += list(rows.values()) or [RowPlan(v.name, v, fmt, None, "-")]
    ref_rows = [r for r in plan.of(ref.name) if r.evaluates]
    if evaluates and not ref_rows:
        raise QuantpipeError(f"eval.runtimes: none of {', '.join(recipe.eval.runtimes)} loads the reference "
                             f"'{ref.name}' (format {plan.of(ref.name)[0].format}); add auto")
    if evaluates and runtimes.get_runtime(ref_rows[0].runtime or "").capabilities.scores != "full":
        raise QuantpipeError(f"eval.runtimes: the reference '{ref.name}' is scored first in runtime "
                             f"'{ref_rows[0].runtime}', which returns only top-k log-probs; KL divergence needs the "
                             "reference's full distribution: list a full-logits runtime (auto) first")
    return plan


def reference_row(plan: Plan, recipe: Recipe) -> RowPlan:
    """The row whose log-probs every other row's KL divergence is measured against."""
    rows = plan.of(recipe.reference.name)
    return next((r for r in rows if r.evaluates), rows[0])
