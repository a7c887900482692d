#!/usr/bin/env python3
"""Mutation check for ich_nb: do the notebooks' tests catch wrong science?

Each mutation in `.ci/mutations.toml` is one small, plausible bug (a boundary flipped, an option not passed on,
a correction skipped) written as an exact snippet of a notebook's *exported* source and its replacement. For
every mutation this tool

1. copies the repository (the working tree as git sees it: tracked and untracked, not ignored files) into a
   temporary folder -- the working tree itself is never touched;
2. replaces the snippet (it must occur exactly once in the notebook's `#| export` cells; a snippet that is no
   longer there is reported STALE and fails the run, so the list cannot silently rot), and re-exports that
   notebook there (`nbdev_export --path`);
3. runs the tests of the notebooks that should catch the bug (`nbdev_test --path`, the mutated notebook first,
   then its dependants, in the copy and with `PYTHONPATH` pointing at it so `import ich_nb` is the mutant),
   stopping at the first notebook that fails.

A mutation is KILLED when a notebook's tests fail, TIMEOUT when they run past the time limit (counted as
killed, reported apart) and SURVIVED when every listed notebook passes: then a test is missing (strengthen
the tests until it is killed) or the mutation does not change the science (say why and remove it). Before
any mutation, the unmutated copy must pass the tests of every notebook involved, else the run aborts.

The score is (killed + timeouts) / mutations run. A mutation that cannot be tested is not scored and fails the
run: STALE (snippet gone), AMBIGUOUS (it occurs more than once), NOEFFECT (the generated package did not change)
or ERROR (`nbdev_test` itself failed outside the notebook's cells twice, e.g. a worker that could not start).
Exit status: 0 when every mutation was tested and the score is at least `--min-score` (default 0.95); 1 when
the score is lower; 2 when a mutation could not be tested, the list is malformed or the unmutated copy fails.
Mutations of the notebooks in the list's `[pending]` table (code being rewritten) are listed, not run, unless
`--pending` is given.

Usage (Python >= 3.11, or 3.10 with `tomli`; from the repository root, in the project's venv with `nbdev_export` and
`nbdev_test` on the PATH; R's pROC installed, as in CI, so that the DeLong comparison runs):

    python .ci/mutate.py --list                      # the mutations, their notebooks and the tests that run
    python .ci/mutate.py                             # all of them (tens of minutes on 2 cores)
    python .ci/mutate.py --only stats --jobs 2       # ids or notebooks matching a regular expression
    python .ci/mutate.py --only 'window\\.' --timeout 300 --min-score 1
    python .ci/mutate.py --own --only review         # quick triage: only the mutated notebook's own tests
    python .ci/mutate.py --downstream --only window  # only the dependants: do the notebooks using the code see the bug?

Each mutation costs an export (seconds) and the tests of its notebooks until the first failure; a survivor
runs all of its notebooks. The default time limit per mutation is three times what the unmutated tests of
its notebooks took, plus 60 s. It is not part of the default CI run.
"""
from __future__ import annotations
import argparse, concurrent.futures as cf, hashlib, json, os, re, shutil, signal, subprocess, sys, tempfile, threading, time
from dataclasses import dataclass, field
from pathlib import Path

try: import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` package, if installed
    try: import tomli as tomllib
    except ModuleNotFoundError: tomllib = None

ROOT = Path(__file__).resolve().parent.parent
LIST = Path(__file__).resolve().parent / 'mutations.toml'
_EXPORT = re.compile(r'^\s*#\s*\|\s*export[is]?\b', re.M)  # `#| export`, `exporti`, `exports` (nbdev 2): cells that reach the module


@dataclass
class Mutation:
    "One semantic mutation: an exact snippet of a notebook's exported source, its replacement and the tests that should catch it."
    id: str
    notebook: str  # stem, e.g. '40_stats'
    find: str
    replace: str
    why: str  # the plausible bug, in one line
    tests: list = field(default_factory=list)  # notebook stems, the mutated one first
    pending: str = ''  # why it is not run yet (its notebook is in the list's [pending] table)


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # KILLED, SURVIVED, TIMEOUT, STALE, AMBIGUOUS, NOEFFECT, ERROR
    notebook: str = ''  # the notebook whose tests failed (KILLED) or were running (TIMEOUT)
    detail: str = ''  # the failing test's error line, or why the mutation could not be applied
    seconds: float = 0.


def die(msg: str, code: int = 2):
    print(f"mutate: {msg}", file=sys.stderr); sys.exit(code)


def load_mutations(path: Path = LIST) -> list[Mutation]:
    "The mutation list, checked: unique ids, known notebooks, every field present."
    if tomllib is None: die("reading the mutation list needs Python >= 3.11 (tomllib) or the tomli package")
    try: cfg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e: die(f"{path}: {e}")
    deps, pending, out, seen = cfg.get('tests', {}), cfg.get('pending', {}), [], set()
    for i, m in enumerate(cfg.get('mutation', [])):
        miss = [k for k in ('id', 'notebook', 'find', 'replace', 'why') if k not in m]
        if miss: die(f"{path}: mutation #{i + 1} ({m.get('id', 'no id')}) lacks {miss}")
        extra = set(m) - {'id', 'notebook', 'find', 'replace', 'why', 'tests'}
        if extra: die(f"{path}: mutation {m['id']!r} has unknown key(s) {sorted(extra)}")
        if m['id'] in seen: die(f"{path}: mutation id {m['id']!r} repeats")
        seen.add(m['id'])
        if m['find'] == m['replace']: die(f"{path}: mutation {m['id']!r}: replace equals find")
        tests = list(m.get('tests', deps.get(m['notebook'], [m['notebook']])))
        if m['notebook'] in tests: tests.remove(m['notebook'])
        tests = [m['notebook']] + tests
        for nb in tests:
            if not (ROOT / 'nbs' / f'{nb}.ipynb').is_file(): die(f"{path}: mutation {m['id']!r}: no notebook nbs/{nb}.ipynb")
        out.append(Mutation(m['id'], m['notebook'], m['find'], m['replace'], m['why'], tests, pending.get(m['notebook'], '')))
    if not out: die(f"{path}: no [[mutation]] entries")
    return out


def exported_sources(nb: dict) -> list[tuple[int, str]]:
    "(cell index, source) of the notebook's `#| export` code cells."
    return [(i, ''.join(c['source'])) for i, c in enumerate(nb['cells'])
            if c['cell_type'] == 'code' and _EXPORT.search(''.join(c['source']))]


def apply(m: Mutation, repo: Path) -> tuple[str, str]:
    "Apply `m` to the notebook in `repo`; returns (status, detail): ('', '') when applied."
    p = repo / 'nbs' / f'{m.notebook}.ipynb'
    nb = json.loads(p.read_text())
    hits = [(i, s) for i, s in exported_sources(nb) if m.find in s]
    n = sum(s.count(m.find) for _, s in hits)
    if n == 0: return 'STALE', f"snippet not found in the exported cells of {p.name}: {m.find.splitlines()[0][:70]!r}"
    if n > 1: return 'AMBIGUOUS', f"snippet occurs {n} times in the exported cells of {p.name}"
    i, s = hits[0]
    nb['cells'][i]['source'] = s.replace(m.find, m.replace).splitlines(keepends=True)
    p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return '', ''


def copy_repo(dest: Path):
    "Copy the working tree as git sees it (tracked + untracked, not ignored) into `dest`."
    r = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                       capture_output=True, check=True)
    for rel in sorted(set(r.stdout.decode().split('\0')) - {''}):
        src = ROOT / rel
        if not src.is_file(): continue  # deleted in the working tree, or a submodule
        (dest / rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(src, dest / rel)


def lib_digest(repo: Path) -> str:
    "Hash of the generated package (without the index), to see that a mutation reached it."
    h = hashlib.sha256()
    for f in sorted((repo / 'ich_nb').glob('*.py')):
        if f.name != '_modidx.py': h.update(f.name.encode()); h.update(f.read_bytes())
    return h.hexdigest()


def env_for(repo: Path) -> dict:
    "Environment of the tools run in `repo`: its package first on the path, its own temporary folder."
    tmp = repo / '.tmp'; tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH',)}
    return dict(env, PYTHONPATH=str(repo), TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE='1')


def run(cmd: list, repo: Path, timeout: float | None) -> tuple[int | None, str]:
    "Run `cmd` in `repo` (its own process group, killed whole on timeout); (returncode or None on timeout, output)."
    p = subprocess.Popen(cmd, cwd=repo, env=env_for(repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try: out, _ = p.communicate(timeout=timeout); return p.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); out, _ = p.communicate(); return None, out


def error_line(out: str) -> str:
    "What failed in an nbdev_test run: the exception line and the notebook line that raised it."
    lines = out.splitlines()
    exc = [l.strip() for l in lines if re.match(r'^[\w.]*(Error|Exception|Exit|Interrupt)\b', l.strip())]
    at = [lines[i + 1].strip() for i, l in enumerate(lines[:-1]) if re.search(r'File "<ipython-input-[^>]*>", line \d+', l)]
    cell = re.findall(r'While Executing Cell #(\d+)', out)
    msg = exc[-1] if exc else (lines[-1].strip() if lines else 'no output')
    if at: msg += f" | cell {cell[-1] if cell else '?'}: {at[-1]}"
    return msg[:220]


def test_nb(repo: Path, nb: str, timeout: float | None, retry: bool = True) -> tuple[str, str, float]:
    "('pass' | 'fail' | 'timeout' | 'error', error line, seconds) of one notebook's tests in `repo`."
    t0 = time.perf_counter()
    rc, out = run(['nbdev_test', '--path', f'nbs/{nb}.ipynb', '--n_workers', '1'], repo, timeout)
    dt = time.perf_counter() - t0
    if rc is None: return 'timeout', f'no result after {dt:.0f} s', dt
    if rc == 0: return 'pass', '', dt
    if 'While Executing Cell' in out: return 'fail', error_line(out), dt  # a cell of the notebook failed
    if retry and (timeout is None or timeout > dt):  # nbdev_test itself failed: once more, then ERROR
        st, err, dt2 = test_nb(repo, nb, None if timeout is None else timeout - dt, retry=False)
        return st, err, dt + dt2
    return 'error', f"nbdev_test failed outside the notebook's cells: {error_line(out)}", dt


def export(repo: Path, nb: str | None = None) -> tuple[bool, str]:
    "nbdev_export in `repo` (one notebook, or all); (ok, output)."
    rc, out = run(['nbdev_export'] + (['--path', f'nbs/{nb}.ipynb'] if nb else []), repo, 600)
    return rc == 0, out


def check_copy(repo: Path):
    "Abort unless `import ich_nb` in the copy imports the copy's package (not an installed one)."
    rc, out = run([sys.executable, '-c', 'import ich_nb; print(ich_nb.__file__)'], repo, 120)
    if rc != 0 or not Path(out.strip().splitlines()[-1]).resolve().is_relative_to(repo.resolve()):
        die(f"in the copy, `import ich_nb` does not resolve to the copy ({out.strip()[-300:]}); is another ich_nb installed non-editable?")


def baseline(base: Path, notebooks: list, jobs: int) -> dict:
    "Seconds per notebook of the unmutated copy's tests; aborts (exit 2) if any fails."
    ok, out = export(base)
    if not ok: die(f"nbdev_export fails on the unmutated copy:\n{out[-2000:]}")
    check_copy(base)
    print(f"unmutated copy: testing {len(notebooks)} notebook(s): {' '.join(notebooks)}", flush=True)
    with cf.ThreadPoolExecutor(jobs) as ex: res = dict(zip(notebooks, ex.map(lambda nb: test_nb(base, nb, None), notebooks)))
    bad = {nb: r for nb, r in res.items() if r[0] != 'pass'}
    for nb, (st, err, dt) in res.items(): print(f"  {nb:<22} {st:<5} {dt:6.1f} s  {err}", flush=True)
    if bad: die(f"the unmutated copy fails the tests of {', '.join(bad)}: fix that first (nothing was mutated)")
    return {nb: r[2] for nb, r in res.items()}


def mutate_one(m: Mutation, base: Path, work: Path, base_digest: str, limit: float) -> Outcome:
    "Copy `base`, apply `m`, re-export, run its notebooks' tests until one fails."
    t0 = time.perf_counter(); repo = Path(tempfile.mkdtemp(prefix='m', dir=work))  # short: socket paths in its TMPDIR have a 107-byte limit
    try:
        shutil.copytree(base, repo, dirs_exist_ok=True, ignore=shutil.ignore_patterns('.tmp'))
        st, why = apply(m, repo)
        if st: return Outcome(m, st, m.notebook, why, time.perf_counter() - t0)
        ok, out = export(repo, m.notebook)
        if not ok: return Outcome(m, 'ERROR', m.notebook, f"nbdev_export failed: {error_line(out)}", time.perf_counter() - t0)
        if lib_digest(repo) == base_digest:
            return Outcome(m, 'NOEFFECT', m.notebook, 'the generated package did not change', time.perf_counter() - t0)
        for nb in m.tests:
            left = limit - (time.perf_counter() - t0)
            if left <= 0: return Outcome(m, 'TIMEOUT', nb, f'time limit {limit:.0f} s reached', time.perf_counter() - t0)
            st, err, _ = test_nb(repo, nb, left)
            if st == 'fail': return Outcome(m, 'KILLED', nb, err, time.perf_counter() - t0)
            if st == 'timeout': return Outcome(m, 'TIMEOUT', nb, err, time.perf_counter() - t0)
            if st == 'error': return Outcome(m, 'ERROR', nb, err, time.perf_counter() - t0)
        return Outcome(m, 'SURVIVED', '', f"passed {' '.join(m.tests)}", time.perf_counter() - t0)
    finally: shutil.rmtree(repo, ignore_errors=True)


def preflight(ms: list, repo: Path) -> list[Outcome]:
    "Every mutation's snippet checked against the notebooks before anything runs (STALE / AMBIGUOUS)."
    bad, cache = [], {}
    for m in ms:
        nb = cache.setdefault(m.notebook, json.loads((repo / 'nbs' / f'{m.notebook}.ipynb').read_text()))
        n = sum(s.count(m.find) for _, s in exported_sources(nb))
        if n != 1: bad.append(Outcome(m, 'STALE' if n == 0 else 'AMBIGUOUS', m.notebook,
                                      'snippet not found in the exported cells' if n == 0 else f'snippet occurs {n} times'))
    return bad


def load() -> str: return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--list', action='store_true', help='print the mutations (and any that no longer apply) and exit')
    ap.add_argument('--only', action='append', metavar='PATTERN', help='run the mutations whose id or notebook matches this regular expression (repeatable)')
    ap.add_argument('--jobs', type=int, default=1, help='mutations tested at once (default 1)')
    ap.add_argument('--timeout', type=float, default=None, help="seconds per mutation (default: 3 x its notebooks' unmutated test time + 60)")
    ap.add_argument('--min-score', type=float, default=0.95, help='exit 1 below this mutation score (default 0.95)')
    ap.add_argument('--own', action='store_true', help='test only the mutated notebook (quick triage: survivors are then only candidates)')
    ap.add_argument('--downstream', action='store_true', help="test only the dependants (does a bug reach the notebooks that use the code?)")
    ap.add_argument('--pending', action='store_true', help="also run the mutations of the notebooks in the list's [pending] table")
    ap.add_argument('--file', type=Path, default=LIST, help=f'mutation list (default {LIST.relative_to(ROOT)})')
    a = ap.parse_args(argv)
    ms = load_mutations(a.file)
    if a.only: ms = [m for m in ms if any(re.search(p, m.id) or re.search(p, m.notebook) for p in a.only)]
    if not ms: die(f"no mutation matches {a.only}")
    if a.own and a.downstream: die("--own and --downstream exclude each other")
    if a.own:
        for m in ms: m.tests = [m.notebook]
    if a.downstream:
        ms = [m for m in ms if len(m.tests) > 1]
        for m in ms: m.tests = m.tests[1:]
        if not ms: die("no selected mutation has dependants to test")
    if a.list: return list_mutations(ms)
    held = [] if a.pending else [m for m in ms if m.pending]
    ms = [m for m in ms if m not in held]
    for nb in dict.fromkeys(m.notebook for m in held):
        print(f"mutate: {sum(m.notebook == nb for m in held)} mutation(s) of {nb} pending, not run ({held[[m.notebook for m in held].index(nb)].pending}); --pending runs them")
    if not ms: die("every selected mutation is pending; --pending runs them")
    t_start = time.perf_counter(); print(f"mutate: {len(ms)} mutation(s), jobs {a.jobs}, load average {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix='ichmut') as work:
        work = Path(work); base = work / 'base'; base.mkdir(); copy_repo(base)
        stale = preflight(ms, base)
        for o in stale: print(f"{o.status:<9} {o.mutation.id}: {o.detail} ({o.mutation.notebook})", flush=True)
        if stale: die(f"{len(stale)} mutation(s) no longer apply (the code changed): update {a.file.name}")
        nbs = list(dict.fromkeys(nb for m in ms for nb in m.tests))
        secs = baseline(base, nbs, a.jobs); digest = lib_digest(base)
        lock, res = threading.Lock(), []
        def one(m):
            limit = a.timeout or 3 * sum(secs[nb] for nb in m.tests) + 60
            o = mutate_one(m, base, work, digest, limit)
            with lock:
                res.append(o); where = f" in {o.notebook}" if o.status in ('KILLED', 'TIMEOUT', 'ERROR') else ''
                print(f"[{len(res)}/{len(ms)}] {o.status:<8} {m.id}{where} ({o.seconds:.0f} s): {o.detail if o.status != 'SURVIVED' else m.why}", flush=True)
            return o
        with cf.ThreadPoolExecutor(a.jobs) as ex: list(ex.map(one, ms))
    return report(res, a.min_score, time.perf_counter() - t_start)


def list_mutations(ms: list) -> int:
    "Print the mutations with their tests, flagging pending ones and those that no longer apply; 2 if any of the latter is not pending."
    stale = {o.mutation.id: o for o in preflight(ms, ROOT)}
    for m in ms:
        flag = f"  [{stale[m.id].status}: {stale[m.id].detail}]" if m.id in stale else ''
        flag += '  [pending]' if m.pending else ''
        print(f"{m.id:<34} {m.notebook:<13} {m.why}{flag}\n{'':<34} tests: {' '.join(m.tests)}")
    by = {}
    for m in ms: by[m.notebook] = by.get(m.notebook, 0) + 1
    print(f"{len(ms)} mutation(s): " + ', '.join(f"{k} {v}" for k, v in sorted(by.items()))
          + (f"; pending: {sum(bool(m.pending) for m in ms)}" if any(m.pending for m in ms) else '')
          + (f"; {len(stale)} STALE/AMBIGUOUS" if stale else ''))
    return 2 if any(not o.mutation.pending for o in stale.values()) else 0


def report(res: list, min_score: float, seconds: float) -> int:
    "Print the score and the survivors; the exit status."
    broken = [o for o in res if o.status in ('STALE', 'AMBIGUOUS', 'NOEFFECT', 'ERROR')]
    counted = [o for o in res if o.status in ('KILLED', 'TIMEOUT', 'SURVIVED')]
    killed = sum(o.status == 'KILLED' for o in counted); tout = sum(o.status == 'TIMEOUT' for o in counted)
    surv = [o for o in counted if o.status == 'SURVIVED']
    score = (killed + tout) / len(counted) if counted else 0.
    print(f"\nmutation score {score:.3f}: {killed} killed, {tout} timed out, {len(surv)} survived of {len(counted)}"
          + (f"; {len(broken)} could not be tested" if broken else '') + f" ({seconds:.0f} s, load average {load()})")
    for o in surv: print(f"  SURVIVED {o.mutation.id} ({o.mutation.notebook}): {o.mutation.why}")
    for o in broken: print(f"  {o.status} {o.mutation.id} ({o.notebook}): {o.detail}")
    if broken: return 2
    return 0 if score >= min_score else 1


if __name__ == '__main__': sys.exit(main())
