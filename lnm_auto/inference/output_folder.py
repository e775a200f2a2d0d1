"""lnm_predict's output folder: kept apart from the inputs, and only ever holding changes to its own files.

Rules (documentation/robustness.md):
  * ``-o`` may not hold an input: it may not be ``-i``, a folder above ``-i``, nor the folder of any file read
    (a case's images, node mask or DICOM folder, the node table); so no output path can equal an input file.
    ``-o`` below ``-i`` is allowed (``-i cases -o cases/predictions``): sub-folders without a DICOM series are
    no cases. Paths are compared resolved (a symbolic link to the input folder is the input folder).
  * ``predict_info.json`` records (``files``) every file the run writes, before writing them. A path is only
    claimed where there is no file yet or a file some ``predict_info*.json`` of that folder recorded: a file
    lnm_predict did not write is never replaced, renamed or removed.
  * A rerun removes what its folder's own record lists and it will not rewrite (cases gone from the input, the
    old tables; everything it lists with ``--overwrite``), plus the temporary files of those names a killed run
    left (``utils/stale_temps.py``). Recorded names are taken only if they have the form of lnm_predict's
    outputs (a hand-edited record cannot point elsewhere).
  * ``OutputFolder`` owns one run's part of ``-o`` (``-num_parts``: ``nodes_part<K>.csv``,
    ``predict_info_part<K>.json``): its record goes from ``running`` to ``finished`` or ``failed``.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path

from lnm_auto.datasets.raw_dataset import SAFE_CASE_ID
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json, save_json
from lnm_auto.utils.stale_temps import remove_stale_temp_files

CASE_ROWS = "cases"   # cases/<case>.csv: one case's node rows, written last: the case is done
TABLES = ("nodes", "stations", "patients")
# names lnm_predict writes; a recorded name of any other form is ignored
OUTPUT_NAME = re.compile(r"(?:(?:nodes|stations|patients)(?:_part\d+)?\.csv|predict_info(?:_part\d+)?\.json"
                         r"|[A-Za-z0-9][A-Za-z0-9_.\-]*_(?:probmap|nodes)\.nii\.gz"
                         rf"|{CASE_ROWS}/[A-Za-z0-9][A-Za-z0-9_.\-]*\.csv)")


def case_files(case_id: str) -> list[str]:
    """Every file (relative to -o) lnm_predict writes for one case, the one marking it done last."""
    return [f"{case_id}_nodes.nii.gz", f"{case_id}_probmap.nii.gz", f"{CASE_ROWS}/{case_id}.csv"]


def refuse_output_holding_inputs(output_dir: Path, input_dir: Path, inputs: list[Path]) -> None:
    """One line when ``-o`` is ``-i``, lies above ``-i``, or is (or lies above) the folder of an input file."""
    out = Path(output_dir).resolve()
    if out == Path(input_dir).resolve():
        raise LNMError(f"-o {output_dir}: is the input folder (-i {input_dir}); lnm_predict never writes beside its "
                       "inputs: give a folder of its own for the outputs")
    for path in inputs:
        resolved = Path(path).resolve()
        if out == resolved or out in resolved.parents:
            kind = "folder" if resolved.is_dir() else "file"
            raise LNMError(f"-o {output_dir}: holds the input {kind} {path}; give an output folder that holds none "
                           "of the inputs")


def recorded_files(info: dict, suffix: str = "") -> set[str]:
    """The files a ``predict_info.json`` says its run wrote (names of lnm_predict's outputs only); for a record
    of an older lnm_auto without ``files``, the names its cases and tables have."""
    if "files" in info:
        files = info["files"] if isinstance(info["files"], list) else []
        return {f for f in files if isinstance(f, str) and OUTPUT_NAME.fullmatch(f)}
    if not isinstance(info.get("settings"), dict):
        return set()
    cases = info.get("cases", []) if isinstance(info.get("cases"), list) else []
    names = {f for c in cases if isinstance(c, str) and SAFE_CASE_ID.match(c) for f in case_files(c)}
    return names | {f"{t}{suffix}.csv" for t in TABLES}


def _read_record(info_file: Path, output_dir: Path) -> dict:
    """A previous run's predict_info.json ({} when none). A damaged one is refused, --overwrite or not: without
    the record, which files there lnm_predict wrote is unknown."""
    if not info_file.is_file():
        return {}
    try:
        previous = load_json(info_file)
        if not (isinstance(previous, dict) and "status" in previous and isinstance(previous.get("cases", []), list)):
            raise ValueError("not a record")
    except (ValueError, UnicodeDecodeError):
        raise LNMError(f"{info_file}: damaged or not written by lnm_predict, so which files in {output_dir} it wrote "
                       "is unknown; remove them yourself or choose another -o") from None
    return previous


def lnm_predict_files(output_dir: Path) -> set[str]:
    """Every file some predict_info*.json of ``output_dir`` records (parts share the folder)."""
    found: set[str] = set()
    for record in output_dir.glob("predict_info*.json"):
        try:
            info = load_json(record)
        except (ValueError, UnicodeDecodeError, OSError):
            continue
        if isinstance(info, dict):
            found |= recorded_files(info, record.stem.removeprefix("predict_info"))
    return found


def prepare_output(output_dir: Path, info_file: Path, settings: dict, case_ids: list[str], tables: list[Path],
                   overwrite: bool, inputs: list[Path]) -> tuple[set[str], dict, list[str]]:
    """Check ``-o`` against the ``inputs`` (input_locations), remove what the previous run there recorded and
    this run will not keep (its tables, the files of cases no longer in the input or not finished; with
    ``overwrite`` everything it recorded), and return (the cases it finished with the same settings: skipped, the
    previous record, the files this run claims). Refuses a folder holding another model's or setting's outputs,
    or a file lnm_predict did not write where this run would write one."""
    if output_dir.exists() and not output_dir.is_dir():
        raise LNMError(f"-o {output_dir}: is a file, not a folder; give a folder for the outputs")
    refuse_output_holding_inputs(output_dir, inputs[0], inputs)
    if (output_dir / CASE_ROWS).is_symlink():   # its files would land wherever it points
        raise LNMError(f"-o {output_dir}: {output_dir / CASE_ROWS} is a symbolic link; lnm_predict writes a folder "
                       "of its own there: remove the link or choose another -o")
    previous = _read_record(info_file, output_dir)
    before = previous.get("settings")
    if previous and before != settings and not overwrite:
        changed = [f"{k}: {(before or {}).get(k)} -> {v}" for k, v in settings.items()
                   if not isinstance(before, dict) or before.get(k) != v]
        raise LNMError(f"{output_dir}: holds predictions made with other settings ({'; '.join(changed)[:300]}); rerun "
                       "with --overwrite to replace them, or choose another -o")
    own = recorded_files(previous, info_file.stem.removeprefix("predict_info"))
    claimed = [t.name for t in tables] + [f for c in case_ids for f in case_files(c)]
    ours = own | lnm_predict_files(output_dir) if output_dir.is_dir() else own
    foreign = next((f for f in claimed + [info_file.name] if (output_dir / f).exists() and f not in ours
                    and not (f == info_file.name and previous)), None)
    if foreign is not None:
        raise LNMError(f"-o {output_dir}: holds {foreign}, which lnm_predict did not write (no predict_info.json "
                       "there records it) and would replace; move it away or choose another -o")
    done = set() if overwrite else {c for c in case_ids if f"{CASE_ROWS}/{c}.csv" in own
                                    and (output_dir / CASE_ROWS / f"{c}.csv").is_file()
                                    and (not settings["probability_maps"]
                                         or (output_dir / f"{c}_probmap.nii.gz").is_file())}
    keep = set() if overwrite else {f for c in done for f in case_files(c)}
    for name in sorted(own - keep) + [f for f in claimed if f not in own and f not in keep]:
        path = output_dir / name
        if name in own and (path.is_file() or path.is_symlink()):   # a link goes, never what it points to
            path.unlink()
        remove_stale_temp_files(path)                         # temp files of a killed run
    remove_stale_temp_files(info_file)
    try:
        (output_dir / CASE_ROWS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LNMError(f"-o {output_dir}: cannot be created ({e.strerror or e})") from None
    return done, previous, sorted(set(claimed))


@dataclass
class OutputFolder:
    """One run's files in ``-o``: its part's tables and ``predict_info.json``, and the record written there."""
    output_dir: Path
    num_parts: int = 1
    part_id: int = 0
    record: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_parts < 1 or not 0 <= self.part_id < self.num_parts:
            raise LNMError(f"-part_id must lie in 0..num_parts-1 and -num_parts be at least 1 (got -num_parts "
                           f"{self.num_parts} -part_id {self.part_id})")
        self.output_dir = Path(self.output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise LNMError(f"-o {self.output_dir}: is a file, not a folder; give a folder for the outputs")

    @property
    def suffix(self) -> str:
        return f"_part{self.part_id}" if self.num_parts > 1 else ""

    @property
    def info_file(self) -> Path:
        return self.output_dir / f"predict_info{self.suffix}.json"

    @property
    def tables(self) -> list[Path]:
        """nodes, stations, patients (of this part)."""
        return [self.output_dir / f"{name}{self.suffix}.csv" for name in TABLES]

    def claim(self, settings: dict, case_ids: list[str], overwrite: bool, inputs: list[Path]) -> tuple[set[str], dict]:
        """``prepare_output`` for this run, then the record ``running`` (with every file the run may write) before
        any output. Returns (the cases already done: skipped, the previous record)."""
        done, previous, files = prepare_output(self.output_dir, self.info_file, settings, case_ids, self.tables,
                                               overwrite, inputs)
        self.record = {"settings": settings, "cases": case_ids, "files": files}
        save_json({"status": "running", **self.record,
                   "started": datetime.datetime.now().isoformat(timespec="seconds")}, self.info_file)
        return done, previous

    def failed(self, failures: list[str], warnings: dict[str, str]) -> None:
        save_json({"status": "failed", **self.record, "failed": failures, "domain_warnings": warnings}, self.info_file)

    def finished(self, info: dict) -> dict:
        """Write the finished record (``info`` after the settings, cases and files); returns it."""
        record = {"status": "finished", **self.record, **info}
        save_json(record, self.info_file)
        return record
