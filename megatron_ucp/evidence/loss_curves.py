"""Compare the loss curves of a baseline run and runs resumed from its (universal) checkpoints.

A baseline trains iterations 1..200 at one topology; a resumed run loads the baseline's iteration-100
checkpoint and trains 101..200 at another. If the checkpoint carried everything (weights, optimizer
state, LR schedule, data position), the resumed curve matches the baseline from iteration 101 on.

* :func:`load_curves` reads a run: a folder holding ``loss.jsonl`` (preferred) or TensorBoard events
  anywhere below it, a ``loss.jsonl`` path, or an events file. Curves map iteration -> loss, so every
  comparison aligns by iteration, never by position. A mixture-of-experts run also has its auxiliary
  (load-balancing) loss per training iteration (``moe_loss`` in loss.jsonl): the ``moe`` curve.
* :func:`compare` measures one run against the reference over the iterations after the resume
  (``Comparison``: per-split first-step, max and mean absolute differences and a pass/fail verdict;
  a resumed run missing reference iterations, or a NaN/inf loss in either run, always fails). The
  load-balancing loss, when either run has one, is judged like the training loss (same tolerances).
* :func:`format_table` renders a ``Step  Reference  Compared  Difference`` table and a summary.
* :func:`write_report` writes ``training_loss.png``, ``validation_loss.png``, ``training_loss.csv``,
  ``validation_loss.csv`` (and ``moe_loss.png``/``.csv`` when a run has a load-balancing loss) and
  ``verdict.json``, each through a temporary name renamed into place.

``loss.jsonl`` stores Python float reprs, so equality there is bitwise; TensorBoard stores float32.
Input problems raise :class:`LossCurveError` (a ``ValueError``) whose message names the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from megatron_ucp.training.logger import TAG_MOE_LOSS, TAG_TRAIN_LOSS, TAG_VALID_LOSS, read_loss_log
from megatron_ucp.atomic import atomic_open

SPLITS = ("train", "valid")  # the LM loss: every run has them
AUX = "moe"  # an MoE run's load-balancing loss, one value per training iteration (loss.jsonl's ``moe_loss``)
ALL_SPLITS = SPLITS + (AUX,)
STEP_SPLITS = ("train", AUX)  # logged every training iteration: the first resumed step is checked (rtol_first)
SPLIT_TAGS = {"train": TAG_TRAIN_LOSS, "valid": TAG_VALID_LOSS, AUX: TAG_MOE_LOSS}
SPLIT_TITLES = {"train": "Training loss", "valid": "Validation loss", AUX: "Load-balancing loss"}
SPLIT_STEMS = {"train": "training_loss", "valid": "validation_loss", AUX: "moe_loss"}
SPLIT_YLABELS = {"train": "lm loss", "valid": "lm loss", AUX: "load-balancing loss (unweighted)"}
LOSS_LOG_NAME = "loss.jsonl"
# The tolerance a verdict is judged by when no assertion was requested (recorded, never fatal).
DEFAULT_ATOL = 0.05


class LossCurveError(ValueError):
    """A run that cannot be read or compared; the message names the offending file."""


# --------------------------------------------------------------------------------------------- loading


@dataclass
class TopologySegment:
    """Consecutive training records written at one topology."""

    first: int
    last: int
    topology: dict | None


@dataclass
class Curves:
    """One run's losses by iteration."""

    label: str
    source: str  # the file (loss.jsonl) or folder/file (TensorBoard) that was read
    kind: str  # "loss.jsonl" or "tensorboard"
    train: dict[int, float] = field(default_factory=dict)
    valid: dict[int, float] = field(default_factory=dict)
    topology: dict | None = None  # of the last training record
    segments: list[TopologySegment] = field(default_factory=list)
    moe: dict[int, float] = field(default_factory=dict)  # the load-balancing loss of an MoE run

    def split(self, name: str) -> dict[int, float]:
        if name not in ALL_SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {ALL_SPLITS}")
        return {"train": self.train, "valid": self.valid, AUX: self.moe}[name]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "source": self.source, "kind": self.kind,
                               "topology": self.topology}
        for split in SPLITS + ((AUX,) if self.moe else ()):
            its = sorted(self.split(split))
            out[split] = {"count": len(its), "first": its[0] if its else None, "last": its[-1] if its else None}
        if len(self.segments) > 1:
            out["topology_segments"] = [vars(s) for s in self.segments]
        return out


def splits_of(curves_list: Sequence[Curves]) -> tuple[str, ...]:
    """The splits a report shows: the LM loss's, and the load-balancing loss when any run has one."""
    return SPLITS + ((AUX,) if any(cv.moe for cv in curves_list) else ())


def topology_label(topology: dict | None) -> str | None:
    """``TP2 PP2 DP2 bf16`` (``ZeRO-n`` added before the dtype when the stage is not 0; ``SPn``, ``EPn``
    after DP where the run recorded them)."""
    if not topology:
        return None
    parts = [f"{k.upper()}{topology[k]}" for k in ("tp", "pp", "dp", "sp", "ep") if k in topology]
    if topology.get("zero_stage"):
        parts.append(f"ZeRO-{topology['zero_stage']}")
    if topology.get("dtype"):
        parts.append(str(topology["dtype"]))
    return " ".join(parts) or None


def _is_events_file(path: str) -> bool:
    return "tfevents" in os.path.basename(path)


def _find_events(folder: str) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_events_file(f))
    return found


def _record_loss(rec: dict, path: str, key: str = "loss") -> float:
    """The record's ``key`` (its loss) as a float; NaN and infinities are kept (the verdict fails on them)."""
    loss = rec.get(key)
    # bool is an int subclass, yet true is no loss of 1.0; strings are not numbers either.
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        try:
            return float(loss)
        except OverflowError:
            pass
    raise LossCurveError(f"{path}: {rec['split']} record at iteration {rec['iteration']} has no numeric "
                         f"{key!r} ({reprlib.repr(loss)})")


def _read_jsonl(path: str) -> tuple[dict[str, dict[int, float]], list[TopologySegment]]:
    try:
        records = read_loss_log(path)
    except FileNotFoundError:
        raise LossCurveError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise LossCurveError(f"{path}: not a text file ({e})") from None
    except ValueError as e:  # read_loss_log names path:line already
        raise LossCurveError(str(e)) from None
    except (TypeError, OverflowError, RecursionError) as e:
        # Records read_loss_log cannot key (a list as split, an infinite iteration, JSON nested too deep).
        raise LossCurveError(f"{path}: not a loss record ({e})") from None
    except OSError as e:
        raise LossCurveError(f"{path}: cannot read ({e.strerror or e})") from None
    splits: dict[str, dict[int, float]] = {split: {} for split in ALL_SPLITS}
    topologies: dict[int, dict | None] = {}
    for rec in records:
        split = rec["split"]
        if split not in SPLITS:
            continue  # a split this tool does not plot
        splits[split][int(rec["iteration"])] = _record_loss(rec, path)
        if split == "train":
            topologies[int(rec["iteration"])] = rec.get("topology")
            if "moe_loss" in rec:
                splits[AUX][int(rec["iteration"])] = _record_loss(rec, path, "moe_loss")
    segments: list[TopologySegment] = []
    for it in sorted(topologies):
        topo = topologies[it]
        if segments and segments[-1].topology == topo:
            segments[-1].last = it
        else:
            segments.append(TopologySegment(it, it, topo))
    return splits, segments


def _events_of_file(path: str) -> dict[str, list[tuple[float, int, float]]]:
    """(wall time, step, loss) per split of one events file."""
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
        from tensorboard.util import tensor_util
    except ImportError as e:
        raise LossCurveError(f"{path}: reading TensorBoard events needs the tensorboard package ({e})") from None

    guidance = {ea.SCALARS: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 1, ea.IMAGES: 1, ea.AUDIO: 1,
                ea.COMPRESSED_HISTOGRAMS: 1}
    events: dict[str, list[tuple[float, int, float]]] = {}
    try:
        acc = ea.EventAccumulator(path, size_guidance=guidance, purge_orphaned_data=False)
        acc.Reload()
        tags = acc.Tags()
        for split, tag in SPLIT_TAGS.items():
            if tag in tags.get(ea.SCALARS, []):
                events[split] = [(e.wall_time, int(e.step), float(e.value)) for e in acc.Scalars(tag)]
            elif tag in tags.get(ea.TENSORS, []):
                events[split] = [(e.wall_time, int(e.step), float(tensor_util.make_ndarray(e.tensor_proto)))
                                 for e in acc.Tensors(tag)]
    except Exception as e:  # noqa: BLE001 - corrupt or unreadable events files raise many types
        raise LossCurveError(f"{path}: unreadable TensorBoard events ({type(e).__name__}: {e})") from None
    return events


def _read_events(files: Sequence[str], source: str) -> dict[str, dict[int, float]]:
    per_file = []
    for path in files:
        events = _events_of_file(path)
        if events:
            first_wall = min((ev[0][0] for ev in events.values() if ev), default=math.inf)
            per_file.append((first_wall, path, events))
    if not per_file:
        raise LossCurveError(f"{source}: no TensorBoard scalars under {TAG_TRAIN_LOSS!r} or {TAG_VALID_LOSS!r} "
                             f"in {len(files)} events file(s)")
    out: dict[str, dict[int, float]] = {split: {} for split in ALL_SPLITS}
    # Files in the order they were written; within a file, events in order. A later value for a step wins.
    for _, _, events in sorted(per_file, key=lambda t: (t[0], t[1])):
        for split, evs in events.items():
            for _, step, value in evs:
                out[split][step] = value
    return out


def load_curves(path: str | os.PathLike, label: str | None = None) -> Curves:
    """Read a run folder, a ``loss.jsonl``, or a TensorBoard events file/folder.

    A folder with ``loss.jsonl`` is read from that file; otherwise every events file below it is read.
    The label defaults to the topology recorded in loss.jsonl, else the run folder's name.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LossCurveError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        folder_name = os.path.basename(os.path.normpath(os.path.abspath(path)))
        jsonl = os.path.join(path, LOSS_LOG_NAME)
        if os.path.isfile(jsonl):
            source, kind = jsonl, "loss.jsonl"
        else:
            files = _find_events(path)
            if not files:
                raise LossCurveError(f"{path}: neither {LOSS_LOG_NAME} nor TensorBoard events files found below it")
            source, kind = path, "tensorboard"
    else:
        folder_name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        source = path
        if _is_events_file(path):
            kind, files = "tensorboard", [path]
        else:
            kind = "loss.jsonl"

    segments: list[TopologySegment] = []
    if kind == "loss.jsonl":
        splits, segments = _read_jsonl(source)
    else:
        splits = _read_events(files, source)
    if not splits["train"] and not splits["valid"]:
        raise LossCurveError(f"{source}: no training or validation loss records")
    topology = segments[-1].topology if segments else None
    return Curves(label=label or topology_label(topology) or folder_name, source=source, kind=kind,
                  train=splits["train"], valid=splits["valid"], moe=splits[AUX], topology=topology,
                  segments=segments)


def unique_labels(labels: Sequence[str], curves: Sequence[Curves] | None = None) -> list[str]:
    """Make labels distinct (CSV columns and legends need it): add the folder name, then ``#n``."""
    out = list(labels)
    for attempt in range(2):
        counts = {lab: out.count(lab) for lab in out}
        if all(c == 1 for c in counts.values()):
            return out
        for i, lab in enumerate(out):
            if counts[lab] > 1:
                if attempt == 0 and curves is not None:
                    src = curves[i].source
                    folder = os.path.dirname(src) if curves[i].kind == "loss.jsonl" else src
                    out[i] = f"{lab} ({os.path.basename(os.path.normpath(os.path.abspath(folder)))})"
                else:
                    out[i] = f"{lab} #{i + 1}"
    return out


# ------------------------------------------------------------------------------------------ comparing


def _diff(ref: float, cmp: float) -> float:
    """compared - reference, with identical non-finite values counting as equal."""
    if ref == cmp or (math.isnan(ref) and math.isnan(cmp)):
        return 0.0
    return cmp - ref


def _abs(d: float) -> float:
    return math.inf if math.isnan(d) else abs(d)


def _num(x: float | None) -> float | str | None:
    """JSON-safe number: non-finite values as the strings "inf", "-inf", "nan"."""
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


@dataclass
class SplitComparison:
    """One split of a comparison, over the iterations after the resume that both runs logged.

    ``reference_only`` (reference iterations after the resume the compared run lacks) and the non-finite
    losses of either run after the resume fail the split; see :func:`compare`.
    """

    split: str
    resume_iteration: int
    iterations: list[int]
    reference: list[float]
    compared: list[float]
    diffs: list[float]  # compared - reference
    reference_only: list[int]  # after the resume; every one of them fails the split
    compared_only: list[int]  # after the resume, e.g. past the reference's last iteration
    reference_non_finite: list[int] = field(default_factory=list)  # after the resume
    compared_non_finite: list[int] = field(default_factory=list)  # after the resume
    passed: bool = True
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.iterations)

    @property
    def first(self) -> int | None:
        return self.iterations[0] if self.iterations else None

    @property
    def last(self) -> int | None:
        return self.iterations[-1] if self.iterations else None

    @property
    def abs_diffs(self) -> list[float]:
        return [_abs(d) for d in self.diffs]

    @property
    def first_step_abs_diff(self) -> float | None:
        return self.abs_diffs[0] if self.diffs else None

    @property
    def first_step_rel_diff(self) -> float | None:
        if not self.diffs:
            return None
        ref, d = self.reference[0], self.abs_diffs[0]
        if d == 0.0:
            return 0.0
        return d / abs(ref) if ref != 0 and math.isfinite(ref) else math.inf

    @property
    def max_abs_diff(self) -> float | None:
        return max(self.abs_diffs) if self.diffs else None

    @property
    def max_abs_diff_iteration(self) -> int | None:
        if not self.diffs:
            return None
        a = self.abs_diffs
        return self.iterations[a.index(max(a))]

    @property
    def mean_abs_diff(self) -> float | None:
        return math.fsum(self.abs_diffs) / len(self.diffs) if self.diffs else None

    @property
    def unequal_iterations(self) -> list[int]:
        return [it for it, d in zip(self.iterations, self.diffs) if d != 0.0]

    def to_dict(self, tolerance: dict | None = None) -> dict[str, Any]:
        out = {
            "resume_iteration": self.resume_iteration,
            "compared_iterations": {"count": self.count, "first": self.first, "last": self.last},
            "first_step_abs_diff": _num(self.first_step_abs_diff),
            "first_step_rel_diff": _num(self.first_step_rel_diff),
            "max_abs_diff": _num(self.max_abs_diff),
            "max_abs_diff_iteration": self.max_abs_diff_iteration,
            "mean_abs_diff": _num(self.mean_abs_diff),
            "exactly_equal": self.count > 0 and not self.unequal_iterations,
            "unequal_count": len(self.unequal_iterations),
            "reference_only_iterations": self.reference_only,
            "compared_only_iterations": self.compared_only,
            "non_finite_iterations": {"reference": self.reference_non_finite, "compared": self.compared_non_finite},
        }
        if tolerance is not None:
            out["tolerance"] = tolerance
        out["pass"] = self.passed
        out["reasons"] = self.reasons
        if self.notes:
            out["notes"] = self.notes
        return out


@dataclass
class Comparison:
    """A run compared with the reference after the resume iteration."""

    reference_label: str
    compared_label: str
    reference_source: str
    compared_source: str
    resume_iteration: int
    resume_iteration_source: str
    atol: float | None
    rtol_first: float | None
    exact: bool
    train: SplitComparison
    valid: SplitComparison
    moe: SplitComparison | None = None  # when either run has a load-balancing loss

    @property
    def asserted(self) -> bool:
        return self.exact or self.atol is not None or self.rtol_first is not None

    @property
    def splits(self) -> list[SplitComparison]:
        return [self.train, self.valid] + ([self.moe] if self.moe is not None else [])

    @property
    def passed(self) -> bool:
        return all(sc.passed for sc in self.splits)

    @property
    def reasons(self) -> list[str]:
        return [reason for sc in self.splits for reason in sc.reasons]

    @property
    def notes(self) -> list[str]:
        return [note for sc in self.splits for note in sc.notes]

    def get(self, name: str) -> SplitComparison | None:
        """One split's comparison, or None (the load-balancing loss when neither run has one)."""
        return next((sc for sc in self.splits if sc.split == name), None)

    def split(self, name: str) -> SplitComparison:
        """One split's comparison; KeyError for the load-balancing loss when neither run has one."""
        found = self.get(name)
        if found is None:
            raise KeyError(f"no {name!r} split in this comparison")
        return found

    def tolerance(self) -> dict[str, Any]:
        if not self.asserted:
            return {"mode": "default", "asserted": False, "atol": DEFAULT_ATOL, "rtol_first": None, "exact": False,
                    "note": f"no assertion requested; pass is judged with the default atol {DEFAULT_ATOL:g} "
                            "and never fails the command"}
        modes = [m for m, on in (("assert-equal", self.exact), ("assert-close", self.atol is not None),
                                 ("rtol-first", self.rtol_first is not None)) if on]
        return {"mode": "+".join(modes), "asserted": True, "atol": self.atol, "rtol_first": self.rtol_first,
                "exact": self.exact}

    def to_dict(self) -> dict[str, Any]:
        tol = self.tolerance()
        return {
            "reference": self.reference_label,
            "compared": self.compared_label,
            "reference_source": self.reference_source,
            "compared_source": self.compared_source,
            "resume_iteration": self.resume_iteration,
            "resume_iteration_source": self.resume_iteration_source,
            "tolerance": tol,
            "splits": {sc.split: sc.to_dict(tol) for sc in self.splits},
            "pass": self.passed,
            "reasons": self.reasons,
        }


def default_resume_iteration(compared: Curves) -> tuple[int, str]:
    """The iteration the compared run resumed after, and how it was found.

    (first logged iteration) - 1; but when the run's loss.jsonl holds records at more than one topology
    (a resumed run that kept the records it inherited), the iteration before the last topology began.
    """
    if len(compared.segments) > 1:
        last = compared.segments[-1]
        return last.first - 1, (f"topology change in {compared.source}: {topology_label(last.topology)} "
                                f"from iteration {last.first}")
    its = sorted(compared.train) or sorted(compared.valid)
    return its[0] - 1, f"first logged iteration ({its[0]}) - 1"


def _iterations_text(its: Sequence[int]) -> str:
    """``iteration 7``, ``iterations 23..40`` (a contiguous run) or ``iterations 10, 30, ...``."""
    if len(its) == 1:
        return f"iteration {its[0]}"
    if its[-1] - its[0] == len(its) - 1:
        return f"iterations {its[0]}..{its[-1]}"
    return "iterations " + ", ".join(map(str, its[:5])) + (", ..." if len(its) > 5 else "")


def _check_coverage(sc: SplitComparison, name: str) -> None:
    if sc.reference_only:
        n_reference = sc.count + len(sc.reference_only)
        sc.reasons.append(f"{name}: the compared run lacks {len(sc.reference_only)} of the {n_reference} "
                          f"reference iteration(s) after the resume iteration {sc.resume_iteration} "
                          f"({_iterations_text(sc.reference_only)})")


def _check_finite(sc: SplitComparison, name: str, reference: dict[int, float], compared: dict[int, float]) -> None:
    for run, losses, bad in (("reference", reference, sc.reference_non_finite),
                             ("compared", compared, sc.compared_non_finite)):
        if not bad:
            continue
        detail = f"{losses[bad[0]]!r} at iteration {bad[0]}"
        if len(bad) > 1:
            detail = f"{_iterations_text(bad)}; first {detail}"
        sc.reasons.append(f"{name}: non-finite loss in the {run} run after the resume iteration "
                          f"{sc.resume_iteration}: {detail}")


def _check_tolerance(sc: SplitComparison, name: str, atol: float | None, rtol_first: float | None,
                     exact: bool) -> None:
    asserted = exact or atol is not None or rtol_first is not None
    if exact:
        bad = sc.unequal_iterations
        if bad:
            i = sc.iterations.index(bad[0])
            sc.reasons.append(f"{name}: {len(bad)} of {sc.count} iterations differ; first at iteration {bad[0]} "
                              f"({sc.reference[i]!r} vs {sc.compared[i]!r})")
    max_abs_diff, first_step_rel_diff = sc.max_abs_diff, sc.first_step_rel_diff
    assert max_abs_diff is not None and first_step_rel_diff is not None  # _judge calls this only when sc.count > 0
    limit = atol if atol is not None else (None if asserted else DEFAULT_ATOL)
    if limit is not None and not max_abs_diff <= limit:
        sc.reasons.append(f"{name}: max |diff| {max_abs_diff:.6g} at iteration {sc.max_abs_diff_iteration} "
                          f"exceeds atol {limit:g}")
    if rtol_first is not None and sc.split in STEP_SPLITS and not first_step_rel_diff <= rtol_first:
        sc.reasons.append(f"{name}: first compared iteration {sc.first} relative |diff| "
                          f"{first_step_rel_diff:.6g} exceeds rtol-first {rtol_first:g}")


def _judge(sc: SplitComparison, reference: dict[int, float], compared: dict[int, float], atol: float | None,
           rtol_first: float | None, exact: bool) -> None:
    name = SPLIT_TITLES[sc.split].lower()
    _check_coverage(sc, name)
    _check_finite(sc, name, reference, compared)
    if sc.count == 0:
        sc.notes.append(f"no {name} iterations after {sc.resume_iteration} in both runs; nothing to compare")
    else:
        if sc.first != sc.resume_iteration + 1:
            sc.notes.append(f"first compared {name} iteration is {sc.first}, not resume_iteration + 1")
        _check_tolerance(sc, name, atol, rtol_first, exact)
    sc.passed = not sc.reasons


def _non_finite_after(losses: dict[int, float], resume_iteration: int) -> list[int]:
    return sorted(it for it, loss in losses.items() if it > resume_iteration and not math.isfinite(loss))


def _split_comparison(split: str, ref: dict[int, float], cmp: dict[int, float],
                      resume_iteration: int) -> SplitComparison:
    after_ref = {it for it in ref if it > resume_iteration}
    after_cmp = {it for it in cmp if it > resume_iteration}
    its = sorted(after_ref & after_cmp)
    return SplitComparison(
        split=split, resume_iteration=resume_iteration, iterations=its,
        reference=[ref[i] for i in its], compared=[cmp[i] for i in its],
        diffs=[_diff(ref[i], cmp[i]) for i in its],
        reference_only=sorted(after_ref - after_cmp), compared_only=sorted(after_cmp - after_ref),
        reference_non_finite=_non_finite_after(ref, resume_iteration),
        compared_non_finite=_non_finite_after(cmp, resume_iteration))


def compare(reference: Curves, compared: Curves, resume_iteration: int | None = None, atol: float | None = None,
            rtol_first: float | None = None, exact: bool = False) -> Comparison:
    """Compare ``compared`` with ``reference`` on the iterations after ``resume_iteration`` both logged.

    ``atol``: every |compared - reference| (training and validation) must be <= atol; a difference equal
    to atol passes. |diff| is ``abs(compared - reference)`` in float64, exact whenever the two losses are
    within a factor of two of each other. ``rtol_first``: the first compared training iteration's
    |diff| / |reference| must be <= rtol_first. ``exact``: every compared loss must equal the reference
    float exactly. With none of them the verdict is judged with ``DEFAULT_ATOL`` and says no assertion
    was requested. When either run has a load-balancing loss (an MoE run), it is a third split judged
    exactly like the training loss, ``rtol_first`` included.

    Whatever was asserted, a split fails (with a reason) when

    * the compared run lacks an iteration the reference logged after the resume (a truncated or gappy
      resumed run); iterations the compared run logged past the reference's last one have nothing to
      be compared with and are judged by the next rule only;
    * either run logged a NaN or infinite loss after the resume (for the reference that includes the
      iterations the compared run lacks; for the compared run those past the reference's end).

    Nothing to compare is never a pass: when no training iteration after the resume is in both runs
    this raises LossCurveError. A validation split with no common iteration fails only through the
    rules above (the reference evaluated after the resume, the compared run did not).
    """
    for name, v in (("atol", atol), ("rtol_first", rtol_first)):
        if v is not None and not (v >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {v!r}")
    if resume_iteration is None:
        resume_iteration, how = default_resume_iteration(compared)
    else:
        resume_iteration, how = int(resume_iteration), "given"
    names = SPLITS + ((AUX,) if reference.moe or compared.moe else ())
    splits = {split: _split_comparison(split, reference.split(split), compared.split(split), resume_iteration)
              for split in names}
    if not splits["train"].iterations:
        def rng(d: dict) -> str:
            return f"{min(d)}..{max(d)}" if d else "none"

        raise LossCurveError(
            f"{compared.source}: nothing to compare: no training iteration after the resume iteration "
            f"{resume_iteration} is also in {reference.source} (compared run logged {rng(compared.train)}, "
            f"reference {rng(reference.train)})")
    for split, sc in splits.items():
        _judge(sc, reference.split(split), compared.split(split), atol, rtol_first, exact)
    if exact and reference.kind != compared.kind:
        splits["train"].notes.append("the runs come from different sources (loss.jsonl vs TensorBoard float32); "
                                     "exact equality is not expected")
    return Comparison(reference_label=reference.label, compared_label=compared.label,
                      reference_source=reference.source, compared_source=compared.source,
                      resume_iteration=resume_iteration, resume_iteration_source=how, atol=atol,
                      rtol_first=rtol_first, exact=exact, train=splits["train"], valid=splits["valid"],
                      moe=splits.get(AUX))


# ------------------------------------------------------------------------------------------ reporting


def _fmt_g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6e}"


def format_table(comparison: Comparison, max_rows: int = 10, max_valid_rows: int = 50) -> str:
    """The first ``max_rows`` compared training iterations, the validation points, and a summary."""
    c = comparison
    lines = [f"Reference: {c.reference_label}  ({c.reference_source})",
             f"Compared:  {c.compared_label}  ({c.compared_source})",
             f"Resume iteration: {c.resume_iteration}  [{c.resume_iteration_source}]"]
    for sc in c.splits:
        split, limit = sc.split, (max_valid_rows if sc.split == "valid" else max_rows)
        lines.append("")
        lines.append(f"{SPLIT_TITLES[split]} ({sc.count} compared iterations"
                     + (f", {sc.first}..{sc.last})" if sc.count else ")"))
        if not sc.count:
            continue
        lines.append(f"{'Step':>8}  {'Reference':>12}  {'Compared':>12}  {'Difference':>12}")
        for it, r, m, d in list(zip(sc.iterations, sc.reference, sc.compared, sc.diffs))[:limit]:
            lines.append(f"{it:>8}  {r:>12.6f}  {m:>12.6f}  {d:>+12.6f}")
        if sc.count > limit:
            lines.append(f"{'...':>8}  ({sc.count - limit} more)")
    lines.append("")
    lines.append("Summary")
    width = max(16, *(len(SPLIT_TITLES[sc.split]) + 1 for sc in c.splits))
    for sc in c.splits:
        split = sc.split
        if not sc.count:
            lines.append(f"  {SPLIT_TITLES[split]:<{width}} no iterations to compare")
            continue
        lines.append(f"  {SPLIT_TITLES[split]:<{width}} max |diff| = {_fmt_g(sc.max_abs_diff)} (iteration "
                     f"{sc.max_abs_diff_iteration}), mean |diff| = {_fmt_g(sc.mean_abs_diff)}, first-step "
                     f"|diff| = {_fmt_g(sc.first_step_abs_diff)} (relative {_fmt_g(sc.first_step_rel_diff)}), "
                     f"{len(sc.unequal_iterations)} of {sc.count} not bitwise equal")
    tol = c.tolerance()
    settings = ", ".join(f"{k}={tol[k]}" for k in ("atol", "rtol_first") if tol.get(k) is not None)
    if tol.get("exact"):
        settings = ", ".join(s for s in ("exact", settings) if s)
    lines.append(f"Verdict: {'PASS' if c.passed else 'FAIL'} ({tol['mode']}: {settings}"
                 + ("; no assertion requested)" if not tol["asserted"] else ")"))
    for reason in c.reasons:
        lines.append(f"  - {reason}")
    for note in c.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _atomic_write(path: str, write: Callable[[Any], None], binary: bool = False) -> str:
    text_args: dict[str, Any] = {} if binary else {"newline": "", "encoding": "utf-8"}
    with atomic_open(path, "wb" if binary else "w", **text_args) as f:
        write(f)
    return path


def csv_rows(curves_list: Sequence[Curves], comparisons: Sequence[Comparison], split: str) -> list[list[str]]:
    """Header plus one row per iteration any run logged; floats as exact reprs, blanks where absent."""
    labels = [cv.label for cv in curves_list]
    header = ["iteration"] + labels + [f"{c.compared_label} - {c.reference_label}" for c in comparisons]
    compared = [c.get(split) for c in comparisons]
    diffs = [dict(zip(sc.iterations, sc.diffs)) if sc else {} for sc in compared]
    its = sorted(set().union(*(cv.split(split) for cv in curves_list)))
    rows = [header]
    for it in its:
        row = [str(it)] + [repr(cv.split(split)[it]) if it in cv.split(split) else "" for cv in curves_list]
        row += [repr(d[it]) if it in d else "" for d in diffs]
        rows.append(row)
    return rows


def _plot(curves_list: Sequence[Curves], comparisons: Sequence[Comparison], split: str, title: str | None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: the Agg canvas, no global backend, never a window

    alone = not comparisons  # one run: its curve, no difference panel
    fig = Figure(figsize=(10, 5.5 if alone else 7.5), dpi=110)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.93 if alone else 0.95, bottom=0.1 if alone else 0.07,
                        hspace=0.08)
    FigureCanvasAgg(fig)
    if alone:
        top = fig.subplots(1, 1)
        bottom = None
    else:
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.6]})
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    marker = "o" if split == "valid" else None
    by_label = {c.compared_label: (colors[i % len(colors)], c) for i, c in enumerate(comparisons)}
    anything = False
    for k, cv in enumerate(curves_list):
        data = cv.split(split)
        if not data:
            continue
        anything = True
        its = sorted(data)
        if alone:
            top.plot(its, [data[i] for i in its], color=colors[0], lw=1.6, marker=marker, ms=6, label=cv.label)
        elif k == 0:
            top.plot(its, [data[i] for i in its], color="0.25", lw=3.2, alpha=0.45, marker=marker, ms=7,
                     label=f"{cv.label} (reference)", zorder=2)
        else:
            color = by_label.get(cv.label, (colors[(k - 1) % len(colors)], None))[0]
            top.plot(its, [data[i] for i in its], color=color, lw=1.3, ls="--", marker=marker, ms=4,
                     label=cv.label, zorder=3)
    resumes: dict[int, list[str]] = {}
    for c in comparisons:
        resumes.setdefault(c.resume_iteration, []).append(by_label[c.compared_label][0])
    for it, cols in resumes.items():
        for ax in [a for a in (top, bottom) if a is not None]:
            ax.axvline(it, color=cols[0], ls=":", lw=1.4, zorder=1)
        top.annotate(f"resumed after iteration {it}", xy=(it, 0.5), xycoords=("data", "axes fraction"),
                     xytext=(-3, 0), textcoords="offset points", ha="right", va="center", fontsize=9,
                     color=cols[0], rotation=90)
    top.set_ylabel(SPLIT_YLABELS[split])
    top.grid(True, alpha=0.3)
    if anything:
        top.legend(loc="upper right", fontsize=9)
    else:
        top.text(0.5, 0.5, f"no {SPLIT_TITLES[split].lower()} recorded", transform=top.transAxes,
                 ha="center", va="center", fontsize=12, color="0.4")
    default_title = f"{SPLIT_TITLES[split]}: " + " vs ".join(cv.label for cv in curves_list)
    top.set_title(f"{title} - {SPLIT_TITLES[split].lower()}" if title else default_title)

    if bottom is None:
        top.set_xlabel("iteration")
        return fig
    atols = {c.atol for c in comparisons if c.atol is not None}
    bottom.axhline(0.0, color="0.3", lw=0.8)
    for c in comparisons:
        sc = c.get(split)
        if sc is None or not sc.count:
            continue
        color = by_label[c.compared_label][0]
        stat = (f"max |diff| {sc.max_abs_diff:.3g}" if sc.max_abs_diff else "identical (max |diff| 0)")
        bottom.plot(sc.iterations, sc.diffs, color=color, lw=1.0, marker=".", ms=4 if split == "train" else 7,
                    label=f"{c.compared_label} - {c.reference_label}: {stat}")
    for atol in sorted(atols):
        bottom.axhspan(-atol, atol, color="tab:green", alpha=0.12, lw=0, label=f"\u00b1atol {atol:g}")
    bottom.set_ylabel("compared \u2212 reference")
    bottom.set_xlabel("iteration")
    bottom.grid(True, alpha=0.3)
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="best", fontsize=8)
    return fig


def build_verdict(curves_list: Sequence[Curves], comparisons: Sequence[Comparison]) -> dict[str, Any]:
    return {
        "pass": all(c.passed for c in comparisons),
        "asserted": any(c.asserted for c in comparisons),
        "reference": curves_list[0].summary() if curves_list else None,
        "runs": [cv.summary() for cv in curves_list],
        "comparisons": [c.to_dict() for c in comparisons],
    }


def write_report(curves_list: Sequence[Curves], comparisons: Sequence[Comparison], output_dir: str | os.PathLike,
                 title: str | None = None) -> dict[str, str]:
    """Write the PNGs, CSVs and ``verdict.json`` (last) into ``output_dir``; returns name -> path."""
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    paths: dict[str, str] = {}
    for split in splits_of(curves_list):
        stem = SPLIT_STEMS[split]
        rows = csv_rows(curves_list, comparisons, split)
        paths[f"{stem}.csv"] = _atomic_write(os.path.join(output_dir, f"{stem}.csv"),
                                             lambda f: csv.writer(f, lineterminator="\n").writerows(rows))
        fig = _plot(curves_list, comparisons, split, title)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        paths[f"{stem}.png"] = _atomic_write(os.path.join(output_dir, f"{stem}.png"),
                                             lambda f: f.write(buf.getvalue()), binary=True)
    verdict = build_verdict(curves_list, comparisons)
    verdict["outputs"] = {k: os.path.basename(v) for k, v in paths.items()}
    if title:
        verdict["title"] = title
    paths["verdict.json"] = _atomic_write(os.path.join(output_dir, "verdict.json"),
                                          lambda f: f.write(json.dumps(verdict, indent=2) + "\n"))
    return paths


def compare_runs(paths: Iterable[str | os.PathLike], labels: Sequence[str] | None = None,
                 resume_iteration: int | None = None, atol: float | None = None, rtol_first: float | None = None,
                 exact: bool = False) -> tuple[list[Curves], list[Comparison]]:
    """Load every run (the first is the reference) and compare each other run with it. One run alone is
    plotted, with nothing to compare (and no assertion to check)."""
    paths = list(paths)
    if not paths:
        raise LossCurveError("need at least one run")
    if len(paths) < 2 and (atol is not None or rtol_first is not None or exact):
        raise LossCurveError("an assertion needs a reference run and at least one run to compare with it")
    if labels is not None and len(labels) != len(paths):
        raise LossCurveError(f"--labels gives {len(labels)} label(s) for {len(paths)} run(s)")
    curves_list = [load_curves(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    for cv, lab in zip(curves_list, unique_labels([cv.label for cv in curves_list], curves_list)):
        cv.label = lab
    comparisons = [compare(curves_list[0], cv, resume_iteration=resume_iteration, atol=atol,
                           rtol_first=rtol_first, exact=exact) for cv in curves_list[1:]]
    return curves_list, comparisons
