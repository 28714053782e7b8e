"""The package layout keeps its promises: no import circle, and family knowledge only in ``model_patches``.

The import graph is read from the source (every ``import`` statement, at module level or inside functions), so a
circle hidden in a function body counts too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moepatch", "model_patches")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if "templates" in parts:  # the loader template is copied into checkpoints, never imported here
                continue
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules its import statements name (``from a import b`` → ``a.b`` when a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else base)
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_model_patches_never_imports_moepatch():
    graph = import_graph()
    wrong = {module: sorted(t for t in targets if t.split(".")[0] == "moepatch")
             for module, targets in graph.items() if module.split(".")[0] == "model_patches"}
    assert {module: targets for module, targets in wrong.items() if targets} == {}


GENERIC_NAMES = {"layers", "mlp", "gate", "router", "experts", "hidden_size", "num_experts", "top_k", "hidden_dim",
                 "router_aux_loss_coef", "output_router_logits", "weight", "aux_loss_coef", "input"}
"""Names that are moepatch's own vocabulary (MoEModel fields, transformers' shared config keys, any ``nn.Linear``'s
``weight``, the ``aux_loss_coef`` training option, which JetMoE's config also names its coefficient; ``input``, the
argument of torch's own ``nn.Embedding`` / ``nn.Linear`` forward, where Doge's block hands its experts their ids),
not one family's."""

STORAGE_NAMES = {"ParallelExperts", "LinearGLUExperts", "batch_index", "row_tokens", "weight_gate", "weight_up",
                 "weight_down", "w_gate", "gate_network", "calculator", "gate_up_proj", "output_experts", "w1", "w2",
                 "w3", "_apply_gate", "is_transposed", "shared_expert_gate", "norm_topk_prob", "num_selects",
                 "block_sparse_moe", "_experts_implementation"}
"""Where families keep things inside their modules (the storage adapters' and family files' knowledge)."""


def _family_names() -> set[str]:
    import model_patches

    names = set(STORAGE_NAMES)
    for spec in model_patches.families().values():
        names.update(spec.block_classes)
        for value in (spec.layers_attr, spec.block_attr, spec.router_attr, spec.experts_attr, spec.top_k_attr,
                      spec.num_experts_attr, spec.selection_method, *spec.extra_routers,
                      *(spec.expert_modules or ()), *spec.shared_expert_attrs, *spec.identity_projections,
                      *spec.per_expert_config, spec.router_weight_attr, *(spec.router_expert_parameters or ()),
                      *(requirement.attribute.lstrip("^") for requirement in spec.router_requirements),
                      *(field for _, field in spec.training_switches), spec.aux_loss_coef_attr,
                      spec.routing.renormalize if isinstance(spec.routing.renormalize, str) else None,
                      *_block_selection_names(spec)):
            if value:
                names.add(value.lstrip("^"))  # dotted paths whole: "attn.q_proj.gate", not the generic "q_proj"
    return names - GENERIC_NAMES


def _block_selection_names(spec) -> tuple[str, ...]:
    selection = spec.selection_in_block
    if selection is None:
        return ()
    weights = () if selection.weights_argument is None else (selection.weights_argument[1],)
    return (selection.method, selection.indices_argument[1], *weights)


def _feature_modules() -> dict[str, Path]:
    """Every moepatch module except the family implementations (models/) and the tiny-checkpoint builders."""
    return {name: path for name, path in _modules().items()
            if name.startswith("moepatch") and not name.startswith(("moepatch.models", "moepatch.testing"))}


def _code_names(path: Path) -> set[str]:
    """Identifiers, attribute names and string constants used in code (docstrings left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            # a string that is an attribute path (or a regex) names it; words inside messages do not
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", node.value):
                found.add(node.value)
                found.update(node.value.split("."))
            if re.search(r"\(\?:[a-z_|]+\)", node.value):
                found.add(f"path pattern {node.value!r}")
    return found


def test_no_feature_module_names_a_family():
    """Family classes, attribute names and layer-path patterns live in model_patches; features read the spec."""
    family = _family_names()
    offenders = {}
    for name, path in _feature_modules().items():
        used = _code_names(path)
        hits = sorted((used & family) | {n for n in used if n.startswith("path pattern")})
        if hits:
            offenders[name] = hits
    assert offenders == {}


LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("families", ("model_patches",)),
    ("base", ("moepatch._version", "moepatch.compat", "moepatch.errors", "moepatch.validation", "moepatch.schema",
              "moepatch.undo", "moepatch.staged_output")),
    ("data", ("moepatch.data",)),
    ("patch", ("moepatch.feature", "moepatch.config", "moepatch.patch", "moepatch.routing", "moepatch.c2r",
               "moepatch.lora_experts", "moepatch.expert_parallel")),
    ("loading", ("moepatch.loading", "moepatch.models")),
    ("api", ("moepatch",)),
    ("tools", ("moepatch.tools", "moepatch.mixing", "moepatch.task_experts", "moepatch.evaluation")),
    ("training", ("moepatch.training",)),
    ("entry points", ("moepatch.cli", "moepatch.demo", "moepatch.testing")),
)
"""The layer contract, lowest first: a module imports only from its own layer and the layers below it.

* **families** — what each model family looks like (``model_patches``, which never imports moepatch);
* **base** — errors, validation, the declarative config schema, version checks, the undo log, staged writes: no model
  knowledge;
* **data** — the shared data every tool reads: instruction data, synthetic tasks, the embedded corpus, sources;
* **patch** — what runs when a model is patched: the ``Feature`` interface, config, ``apply``, routing, C2R's
  constrained selection, LoRA-expert layers and injection, the expert-parallel dispatch;
* **loading** — patched ``from_pretrained``, ``install``, and the families moepatch implements (LLaMA-MoE, MoLM);
* **api** — the ``moepatch`` package itself (the public names and the feature registry);
* **tools** — what runs a model end to end: profile / place pipelines, permuted checkpoints, allocation search,
  importers / merge / export, dynamic data mixing, task-expert workflows, evaluation, plots;
* **training** — the fine-tuning runner and its run modes;
* **entry points** — the ``moepatch`` command, the demo, and the tiny-model fixtures for tests.
"""


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the longest prefix that names ``module``'s package (or module)."""
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} belongs to no layer of LAYERS: add its package there"
    return found


def against_the_layers(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer to a higher one, as ``"a (layer) -> b (layer)"``."""
    found = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module)
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs > mine:
                found.append(f"{module} ({LAYERS[mine][0]}) -> {target} ({LAYERS[theirs][0]})")
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Package → the other packages its modules import (a package = the module's parent, or a top-level module)."""

    def package(module: str) -> str:
        parts = module.split(".")
        path = _modules()[module]
        return module if path.name == "__init__.py" or len(parts) <= 2 else ".".join(parts[:2])

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = package(module)
        packages.setdefault(source, set())
        for target in targets:
            if package(target) != source:
                packages[source].add(package(target))
    for targets in list(packages.values()):
        for target in targets:
            packages.setdefault(target, set())
    return packages


def test_imports_follow_the_layers():
    assert against_the_layers(import_graph()) == []


def test_no_package_imports_another_in_a_circle():
    """Not only modules: no two packages reach each other (``moepatch.c2r`` ↔ ``moepatch.loading`` would count)."""
    graph = package_graph(import_graph())
    graph.pop("moepatch", None)  # every submodule's import runs moepatch/__init__ first: it is the api layer's
    for targets in graph.values():
        targets.discard("moepatch")
    assert cycles(graph) == []


def test_the_layer_check_fails_on_an_import_against_the_direction():
    """The check itself: one added import from the patch layer up to the command line is reported by name."""
    graph = {module: set(targets) for module, targets in import_graph().items()}
    graph["moepatch.patch"].add("moepatch.cli")
    assert against_the_layers(graph) == ["moepatch.patch (patch) -> moepatch.cli (entry points)"]


def test_no_module_imports_through_an_earlier_path():
    """``moepatch.MOVED_MODULES`` keeps users' earlier import paths working; the package itself imports each module
    where it lives, so the layer check above sees every import for what it is."""
    import moepatch

    earlier = set(moepatch.MOVED_MODULES)
    offenders = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
                if isinstance(node, ast.ImportFrom) and node.module else [])
            hits = sorted(set(names) & earlier)
            if hits:
                offenders.setdefault(name, []).extend(hits)
    assert offenders == {}


DEFERRABLE = ("matplotlib", "deepspeed", "sentence_transformers", "vllm", "datasets", "lm_eval",
              "peft.utils.transformers_weight_conversion")
"""Optional dependencies (or, for peft's weight conversion, one older versions lack): imported where used, so a
missing one fails only the feature that needs it."""
DEFERRED_ON_PURPOSE = {
    ("moepatch/task_experts/manifest.py", "base_model"): "the manifest module stays light for the CLI's file checks",
    ("moepatch/loading/templates/moepatch_loader.py", "_moepatch"): "the remote-code loader imports moepatch late",
}
"""Function-level imports outside the CLI that are there on purpose, each with its reason."""


def _function_level_imports(path: Path) -> list[tuple[str, str]]:
    """``(function, imported module)`` of every import inside a function of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                    found.append((node.name, sub.module))
                elif isinstance(sub, ast.Import):
                    found += [(node.name, alias.name) for alias in sub.names]
    return list(dict.fromkeys(found))


def test_imports_sit_at_module_top_outside_the_cli():
    """The CLI defers heavy imports so ``moepatch --help`` is quick; elsewhere an import inside a function hides a
    dependency (or an import circle): only optional dependencies and the listed exceptions may be deferred."""
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            shown = path.relative_to(ROOT).as_posix()
            if shown.startswith("moepatch/cli/"):
                continue
            for function, module in _function_level_imports(path):
                if module.startswith(DEFERRABLE) or (shown, function) in DEFERRED_ON_PURPOSE:
                    continue
                offenders.append(f"{shown}: {function} imports {module}")
    assert offenders == [], "\n".join(offenders)
