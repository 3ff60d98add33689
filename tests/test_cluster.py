"""Cluster runs and shards in object storage.

- The SLURM and Kubernetes profiles ask for nothing the config does not say: GPUs, memory and
  CPUs come from the rules' resources; a dry run of the demo through each profile plans the jobs.
- Submissions: with a stand-in `sbatch` that records its arguments, the SLURM executor plugin
  asks exactly the config's GPUs and memory, on the GPU partition (no SLURM needed).
- (slow) A real one-node SLURM (Debian's slurm-wlm: munged, slurmctld and slurmd on localhost,
  started here as root) runs the whole demo workflow through profiles/slurm.
- The streaming loader reads a shard folder from a local S3-compatible server (moto's server
  mode) by `s3://` and `http://` URL, and through a `pipe:` command, batch for batch as from disk.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement

from loader_shards import write_split
from msaflow.pipeline.data.loader import make_loader
from msaflow.pipeline.data.shard_index import ShardError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
DEMO = REPO / "datasets" / "demo"
SLURM_PROFILE = REPO / "profiles" / "slurm"
K8S_PROFILE = REPO / "profiles" / "kubernetes"


def demo_config(path: Path, **sections) -> Path:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["dataset"]["root"] = str(DEMO)
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(workdir: Path, configfile: Path, *extra: str, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                           "--configfile", str(configfile), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def planned(stdout: str) -> dict[str, int]:
    """Job counts of a dry run's `Job stats` table."""
    counts, table = {}, False
    for line in stdout.splitlines():
        if line.startswith("job ") and "count" in line:
            table = True
        elif table and line.startswith("total"):
            break
        elif table and len(line.split()) == 2 and line.split()[1].isdigit():
            counts[line.split()[0]] = int(line.split()[1])
    return counts


def planned_resources(stdout: str) -> dict[str, str]:
    """rule -> the `resources:` line of its (first) job in a dry run."""
    out, rule = {}, None
    for line in stdout.splitlines():
        if line.startswith("rule ") and line.endswith(":"):
            rule = line[5:-1]
        elif line.strip().startswith("resources:") and rule and rule not in out:
            out[rule] = line.strip()
    return out


# ---------------------------------------------------------------------------- profiles


def test_profiles_restate_no_gpu_or_memory_of_the_config():
    """GPUs and memory come from the rules' resources (the config), never from a profile."""
    for profile in (SLURM_PROFILE, K8S_PROFILE):
        config = yaml.safe_load((profile / "config.yaml").read_text())
        per_rule = config.get("set-resources") or {}
        for rule, resources in per_rule.items():
            assert not {"gres", "gpu", "gpus", "mem_mb", "mem", "cpus_per_task"} & set(resources), (profile, rule)
        assert not {"gres", "gpu", "gpus"} & set(config.get("default-resources") or {}), profile
    slurm = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    assert slurm["executor"] == "slurm"
    partitions = yaml.safe_load((SLURM_PROFILE / slurm["slurm-partition-config"]).read_text())["partitions"]
    assert any(p.get("max_gpu", 0) == 0 for p in partitions.values())  # CPU jobs have a partition of their own
    assert any(p.get("max_gpu", 0) > 0 for p in partitions.values())
    assert yaml.safe_load((K8S_PROFILE / "config.yaml").read_text())["executor"] == "kubernetes"


@pytest.mark.parametrize("extra, plugin", [("slurm", "slurm"), ("kubernetes", "kubernetes")])
def test_extra_brings_the_executor_plugin(extra, plugin):
    """`pip install msaflow[slurm]` / `[kubernetes]` declare the plugin, and the installed one fits."""
    requirements = [Requirement(r) for r in importlib.metadata.requires("msaflow") or []]
    declared = [r for r in requirements if r.marker is not None and r.marker.evaluate({"extra": extra})]
    names = {r.name for r in declared}
    assert f"snakemake-executor-plugin-{plugin}" in names, declared
    for r in declared:
        assert importlib.metadata.version(r.name) in r.specifier, (r, importlib.metadata.version(r.name))
    from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

    assert ExecutorPluginRegistry().get_plugin(plugin).name == plugin


@pytest.mark.parametrize("profile", [SLURM_PROFILE, K8S_PROFILE], ids=["slurm", "kubernetes"])
def test_dry_run_through_the_profile_plans_the_demo(tmp_path, profile):
    config = demo_config(tmp_path / "demo.yaml", workflow={"extract_gpus": 0, "extract_mem_mb": 3000},
                         train={"gpus": 0, "mem_mb": 5000})
    extra = ["--default-storage-prefix", str(tmp_path)] if profile == K8S_PROFILE else []
    proc = snakemake(tmp_path, config, "--profile", str(profile), "--dry-run", *extra, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = planned(proc.stdout)
    assert counts == {"manifest": 1, "extract": 2, "shards": 1, "train": 1, "evaluate": 1, "report": 1,
                      "all": 1}, counts
    resources = planned_resources(proc.stdout)
    assert "mem_mb=3000" in resources["extract"] and "gpu=0" in resources["extract"], resources["extract"]
    assert "mem_mb=5000" in resources["train"] and "gpu=0" in resources["train"], resources["train"]
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


FAKE_SBATCH = """#!/bin/sh
# stands in for SLURM's sbatch: records the call, answers with a job id
echo "$*" >> "{log}"
n=$(wc -l < "{log}")
echo "$((4000 + n))"
"""
FAKE_STATUS = """#!/bin/sh
# squeue/sacct stand-in: every submitted job has failed (the test only looks at the submissions)
case "$*" in *--name*) n=$(wc -l < "{log}"); i=1; while [ $i -le $n ]; do echo "$((4000 + i))|FAILED"; i=$((i + 1)); done;; esac
exit 0
"""


def test_slurm_submissions_ask_the_configs_gpus_and_memory(tmp_path):
    """What the profile makes the plugin pass to sbatch, per rule, when the config asks for GPUs."""
    fake, log = tmp_path / "bin", tmp_path / "sbatch-calls.txt"
    fake.mkdir()
    log.touch()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_STATUS), ("sacct", FAKE_STATUS),
                       ("scontrol", "#!/bin/sh\nexit 1\n"), ("sinfo", "#!/bin/sh\nexit 1\n")):
        (fake / name).write_text(text.format(log=log))
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    config = demo_config(tmp_path / "gpu.yaml", workflow={"extract_chunks": 1, "extract_gpus": 1, "extract_mem_mb": 3000},
                         extract={"threads": 2}, train={"gpus": 2, "mem_mb": 9000, "threads": 4})
    plan = snakemake(tmp_path, config, "--dry-run", "--forceall", "--cores", "8", timeout=120)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    outputs = {}
    rule = None
    for line in plan.stdout.splitlines():
        if line.startswith("rule ") and line.endswith(":"):
            rule = line[5:-1]
        elif line.strip().startswith("output:") and rule in ("extract", "train"):
            outputs.setdefault(rule, line.split(":", 1)[1].strip())
    run = tmp_path / "results" / "demo"
    (run / "shards").mkdir(parents=True)
    (run / "manifest.csv").write_text("id\n")  # inputs in place: only the wanted job is submitted
    (run / "shards" / "summary.json").write_text("{}")
    calls = {}
    for rule, target in outputs.items():
        before = len(log.read_text().splitlines())
        proc = snakemake(tmp_path, config, "--profile", str(SLURM_PROFILE), "--slurm-status-command", "squeue",
                         "--slurm-init-seconds-before-status-checks", "1", "--retries", "0", target,
                         env=env, timeout=180)
        lines = log.read_text().splitlines()[before:]
        assert len(lines) == 1, f"{rule}: sbatch calls {lines}\n{proc.stdout}\n{proc.stderr}"
        calls[rule] = lines[0]
    assert "--gpus=1" in calls["extract"] and "--mem 3000" in calls["extract"], calls["extract"]
    assert "--cpus-per-task=2" in calls["extract"] or "--cpus-per-task 2" in calls["extract"], calls["extract"]
    assert "--gpus=2" in calls["train"] and "--mem 9000" in calls["train"], calls["train"]
    for call in calls.values():
        assert "-p gpu" in call and "gres" not in call, call  # the partition with GPUs, picked by the plugin


# ---------------------------------------------------------------------------- a real one-node SLURM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """ClusterName=msaflowtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
MinJobAge=3600
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={host} MaxTime=INFINITE State=UP
"""


def _tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else f"({path.name}: none)"


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """munged, slurmctld and slurmd on localhost, with partitions named as in profiles/slurm/partitions.yaml.

    Fails, saying why, where SLURM cannot run here; MSAFLOW_NO_SLURM=1 skips instead.
    """
    if os.environ.get("MSAFLOW_NO_SLURM"):
        pytest.skip("MSAFLOW_NO_SLURM is set: the one-node SLURM tests are skipped")
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "squeue") if shutil.which(b) is None
               and not Path("/usr/sbin", b).exists()]
    if missing:
        pytest.fail(f"SLURM cannot run here: {missing} not installed (apt-get install -y slurm-wlm munge, "
                    "as scripts/setup.sh does; MSAFLOW_NO_SLURM=1 skips these tests)")
    if os.geteuid() != 0:
        pytest.fail(f"SLURM cannot run here: the one-node cluster is started as root, this is {getpass.getuser()}")
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o755)
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munged = shutil.which("munged") or "/usr/sbin/munged"
    started = subprocess.run([munged, "--force", f"--socket={root}/munge/munge.socket", f"--key-file={key}",
                              f"--log-file={root}/munged.log", f"--pid-file={root}/munge/munged.pid",
                              f"--seed-file={root}/munge/seed"], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.fail(f"SLURM cannot run here: munged did not start: {started.stderr}\n{_tail(root / 'munged.log')}")
    host = socket.gethostname().split(".")[0]
    mem_mb = int(int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                          if l.startswith("MemTotal"))) / 1024 * 0.8)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, root=root, ctld_port=free_port(), d_port=free_port(),
                                      cpus=os.cpu_count(), mem_mb=mem_mb))
    # The job-step plugin drops every SLURM_* variable, SLURM_CONF included, before the `srun` it runs
    # inside a job; a cluster keeps its config at the default path, this one lives in the test's folder:
    # an `srun` first on PATH puts SLURM_CONF back.
    wrappers = root / "bin"
    wrappers.mkdir()
    srun = shutil.which("srun") or "/usr/bin/srun"
    (wrappers / "srun").write_text(f'#!/bin/sh\nSLURM_CONF="{conf}" exec "{srun}" "$@"\n')
    (wrappers / "srun").chmod(0o755)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{wrappers}{os.pathsep}{os.environ['PATH']}"}
    daemons = []
    try:
        for daemon in ("slurmctld", "slurmd"):
            exe = shutil.which(daemon) or f"/usr/sbin/{daemon}"
            daemons.append(subprocess.Popen([exe, "-D"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True))
            time.sleep(1)
        deadline, state = time.time() + 60, ""
        while time.time() < deadline:
            probe = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            state = probe.stdout.strip() + probe.stderr.strip()
            if probe.returncode == 0 and "idle" in probe.stdout:
                break
            if any(d.poll() is not None for d in daemons):
                break
            time.sleep(1)
        else:
            state += " (timed out)"
        if "idle" not in state:
            pytest.fail(f"SLURM cannot run here: the node did not come up ({state})\n"
                        f"slurmctld: {_tail(root / 'slurmctld.log')}\nslurmd: {_tail(root / 'slurmd.log')}")
        yield {"env": env, "root": root}
    finally:
        for d in daemons:
            if d.poll() is None:
                os.killpg(d.pid, signal.SIGTERM)
        for d in daemons:
            try:
                d.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(d.pid, signal.SIGKILL)
        pid_file = root / "munge" / "munged.pid"
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@pytest.mark.slow
def test_demo_workflow_runs_on_a_one_node_slurm(local_slurm, tmp_path):
    env = local_slurm["env"]
    config = demo_config(tmp_path / "demo.yaml")
    proc = snakemake(tmp_path, config, "--profile", str(SLURM_PROFILE),
                     # no accounting database on this cluster: job states from squeue (MinJobAge is an hour)
                     "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
                     "--latency-wait", "10", "--jobs", "4", env=env, timeout=1500)
    jobs = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%j|%P|%T"], env=env,
                          capture_output=True, text=True).stdout.splitlines()
    assert proc.returncode == 0, (f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\njobs: {jobs}\n"
                                  f"slurmctld: {_tail(local_slurm['root'] / 'slurmctld.log')}")
    report = tmp_path / "results" / "demo" / "report" / "report.md"
    assert report.is_file()
    assert (tmp_path / "results" / "demo" / "shards" / "train" / "index.json").is_file()
    # every step ran as a SLURM job: 8 rules less `all`, on the partition without GPUs (the config asks none)
    ran = [line.split("|") for line in jobs]
    assert len(ran) == 7, jobs
    assert all(state == "COMPLETED" and partition == "cpu" for _, _, partition, state in ran), jobs
    again = snakemake(tmp_path, config, "--profile", str(SLURM_PROFILE), "--slurm-status-command", "squeue",
                      env=env, timeout=300)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stderr[-2000:]


# ---------------------------------------------------------------------------- object storage


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free localhost port, with credentials and endpoint in the environment."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
        saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                 "AWS_DEFAULT_REGION")}
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _upload(folder: Path, bucket: str, prefix: str, public: bool = False) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}",
                           ExtraArgs={"ACL": "public-read"} if public else None)


def _epoch(location, **kwargs) -> list[dict]:
    return list(make_loader(location, "train", 3, shuffle=True, seed=5, epoch=1, **kwargs))


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["id"] == y["id"]
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[k]), k


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_split(folder, "train", "features", [4, 3, 5])
    return folder


def test_loader_reads_shards_from_s3_and_http_urls(s3_server, shard_folder):
    _upload(shard_folder, "msaflow-shards", "corpus/shards", public=True)
    local = _epoch(shard_folder)
    _same_batches(local, _epoch("s3://msaflow-shards/corpus/shards"))
    _same_batches(_epoch(shard_folder, num_workers=2),  # each worker opens its own remote files
                  _epoch("s3://msaflow-shards/corpus/shards/", num_workers=2))
    _same_batches(local, _epoch(f"{s3_server}/msaflow-shards/corpus/shards"))  # plain HTTP(S), range requests


def test_loader_reads_shards_through_a_pipe_command(shard_folder):
    _same_batches(_epoch(shard_folder), _epoch(f"pipe:cat {shard_folder}/{{path}}"))
    with pytest.raises(ShardError, match=r"needs \{path\}"):
        _epoch("pipe:cat /nowhere/shard.tar")
    with pytest.raises(ShardError, match="no index.json"):
        _epoch(f"pipe:cat {shard_folder}/missing/{{path}}")


def test_remote_shard_damage_is_named_by_its_url(s3_server, shard_folder, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(shard_folder, damaged)
    tar = damaged / "train" / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # cut in the middle
    _upload(damaged, "msaflow-damaged", "shards")
    with pytest.raises(ShardError, match=r"s3://msaflow-damaged/shards/train/train-000001\.tar"):
        _epoch("s3://msaflow-damaged/shards")
    with pytest.raises(ShardError, match=r"s3://msaflow-damaged/nothing/train/index\.json: no index\.json"):
        _epoch("s3://msaflow-damaged/nothing")


def test_msaflow_train_streams_its_shards_from_s3(s3_server, tmp_path):
    """`msaflow train --data s3://...`: the same run as from the local folder."""
    from msaflow.pipeline.cli import main as cli

    local = tmp_path / "local"
    write_split(local, "train", "features", [4, 4], seed=1)
    write_split(local, "valid", "features", [3], seed=2, first_number=100)
    write_split(local, "test", "features", [3], seed=3, first_number=200)
    _upload(local, "msaflow-train", "corpus/shards")
    args = ["--model", "emt", "--freeze-text", "--epochs", "1", "--batch-size", "4", "--threads", "1"]
    assert cli(["train", "--data", str(local), *args, "-o", str(tmp_path / "from-local")]) == 0
    assert cli(["train", "--data", "s3://msaflow-train/corpus/shards", *args, "-o", str(tmp_path / "from-s3")]) == 0
    a = json.loads((tmp_path / "from-local" / "metrics.json").read_text())
    b = json.loads((tmp_path / "from-s3" / "metrics.json").read_text())
    assert a["rates"] == b["rates"] and a["n_test"] == b["n_test"] == 3
