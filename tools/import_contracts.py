"""A contract type for import-linter (``lint-imports``; contracts in pyproject.toml): external submodules.

import-linter's ``forbidden`` contract can forbid an external package only whole (``deepspeed``), since
its import graph keeps one node per external package. ``torch.distributed`` is part of ``torch``, which
the pure modules do import for tensors. This contract reads the import lines instead: no module of
``source_modules``, nor any module of the package that they import (directly or not), has an import
line naming one of ``forbidden_submodules`` (``import torch.distributed``, ``from torch import
distributed``, ``from torch.distributed.x import y``).
"""

from __future__ import annotations

import re

import grimp
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _names(line: str, submodule: str) -> bool:
    """Whether an import line names ``submodule`` (``a.b``) or something inside it."""
    package, _, last = submodule.rpartition(".")
    dotted = re.escape(submodule) + r"(\.|\s|,|$)"
    from_parent = rf"^\s*from\s+{re.escape(package)}\s+import\s+.*\b{re.escape(last)}\b"
    return bool(re.search(r"\b" + dotted, line) or re.search(from_parent, line))


class ForbiddenSubmodulesContract(Contract):
    type_name = "forbidden_submodules"

    source_modules = fields.SetField(subfield=fields.ModuleExpressionField())
    forbidden_submodules = fields.SetField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        matched = {m for expr in self.source_modules for m in graph.find_matching_modules(str(expr))}  # type: ignore
        sources = matched.union(*(graph.find_descendants(m) for m in matched))  # a package: all of it
        reached = set(sources)
        for module in sources:
            reached |= graph.find_upstream_modules(module)
        invalid = []
        for importer in sorted(reached):
            for submodule in sorted(self.forbidden_submodules):  # type: ignore
                top = submodule.split(".")[0]
                if top not in graph.find_modules_directly_imported_by(importer):
                    continue
                for detail in graph.get_import_details(importer=importer, imported=top):
                    if _names(detail["line_contents"], submodule):
                        chain = None if importer in sources else self._chain(graph, sources, importer)
                        invalid.append({"importer": importer, "line_number": detail["line_number"],
                                        "line_contents": detail["line_contents"], "forbidden": submodule,
                                        "chain": chain})
        return ContractCheck(kept=not invalid, metadata={"invalid": invalid})

    @staticmethod
    def _chain(graph: grimp.ImportGraph, sources: set[str], importer: str) -> list[str] | None:
        for source in sorted(sources):
            chain = graph.find_shortest_chain(importer=source, imported=importer)
            if chain:
                return list(chain)
        return None

    def render_broken_contract(self, check: ContractCheck) -> None:
        for hit in check.metadata["invalid"]:
            output.print_error(f"{hit['importer']} imports {hit['forbidden']}:")
            output.print_error(f"-   {hit['importer']}:{hit['line_number']}: {hit['line_contents']}", bold=False)
            if hit["chain"]:
                output.print_error(f"    reached through {' -> '.join(hit['chain'])}", bold=False)
            output.new_line()
