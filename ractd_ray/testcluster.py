"""A Ray cluster laid out like a cloud cluster, on one machine, for the `ray`-marked multi-node tests and
bench/multinode.py.

- storage: a real S3 endpoint, moto's ThreadedMotoServer on 127.0.0.1, one bucket; every process gets
  RACTD_STORAGE_PATH=s3://<bucket>/<prefix> and the endpoint the way a user of an S3-compatible store (MinIO,
  Ceph) gives it to every AWS client: AWS_ENDPOINT_URL plus the usual AWS_ACCESS_KEY_ID /
  AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION variables;
- a head started with --num-cpus=0 (it runs only the drivers, as on cluster.yaml), on this machine's disk;
- worker nodes (`ray start --address`), each in its own mount namespace (`unshare -m`) with a private tmpfs
  over the cache directory: the same path as on the head, a different disk, as on separate machines, and a Ray
  temp dir of its own (/tmp of separate machines: with one shared, every node's log monitor streamed every
  worker's lines, so the driver printed each line once per node).

Needs root (mount namespaces) and moto[server]; `skip_reason()` says why not where it is impossible. Every
process of a node carries RACTD_TEST_NODE=<cluster id>/<node name> in its environment, so `kill_node` ends
exactly that node's processes (SIGKILL: a lost spot instance), nothing else on the machine.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_MARK = "RACTD_TEST_NODE"


def skip_reason() -> str | None:
    """Why the multi-node cluster cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return "needs root for mount namespaces (unshare -m) with a private tmpfs per worker node"
    if shutil.which("unshare") is None:
        return "needs util-linux unshare"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /mnt && umount /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a new mount namespace: {probe.stderr.strip()[:200]}"
    try:
        import boto3  # noqa: F401
        from moto.server import ThreadedMotoServer  # noqa: F401
    except ImportError as e:
        return f"needs moto[server] and boto3 ({e})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiNodeCluster:
    def __init__(self, root: Path, workers: int = 2, cpus_per_worker: int = 2, gpus_per_worker: int = 0):
        """gpus_per_worker: GPUs each worker node declares (`ray start --num-gpus`): logical GPUs, which Ray
        schedules whether or not a device is there (bench/gpu_occupancy.py: a cluster of one-GPU nodes)."""
        self.root = Path(root)
        self.id = secrets.token_hex(4)
        self.workers = [f"w{i + 1}" for i in range(workers)]
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.cache = self.root / "cache"  # the user's cache directory: the head's disk, a tmpfs on each worker
        # Ray's socket paths must stay short (107 bytes): a short temp dir of our own
        self.temp_dir = Path(f"/tmp/rmn-{self.id}")
        self.bucket, self.prefix = f"ractd-{self.id}", "runs"
        self.env: dict[str, str] = {}
        self.address = ""
        self._moto = None
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------------------------------- start / stop
    def start(self) -> "MultiNodeCluster":
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.cache.mkdir(parents=True, exist_ok=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "RACTD_STORAGE_PATH": f"s3://{self.bucket}/{self.prefix}", "RACTD_CACHE_DIR": str(self.cache),
            "D4RL_DATASET_DIR": str(self.cache / "d4rl"), "MINARI_DATASETS_PATH": str(self.cache / "minari"),
            "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                          if p]),
            "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
        }
        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=self.bucket)
        self._start_nodes()
        return self

    def _start_nodes(self) -> None:
        """The head, then the worker nodes one at a time (storage is up)."""
        gcs_port = free_port()
        self.address = f"127.0.0.1:{gcs_port}"
        self.env["RAY_ADDRESS"] = self.address
        ray = str(Path(sys.executable).parent / "ray")
        head = [ray, "start", "--head", "--num-cpus=0", "--num-gpus=0", f"--port={gcs_port}",
                "--object-store-memory=400000000",
                f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}", "--disable-usage-stats", "--block"]
        self._spawn("head", head)
        self.wait_nodes(1, timeout=120)
        for name in self.workers:
            self.start_worker(name)

    def lose_head(self) -> None:
        """The head node is lost with its disk: every node's processes killed (the workers go with the head's GCS,
        as on a cluster without GCS fault tolerance), the head's cache directory emptied, Ray's temp dirs removed;
        then a new head and new workers start, on the same storage (S3 outlives the head). What the commands need
        on the new head, they must find in storage."""
        for name in [*self.workers, "head"]:
            self.kill_node(name)
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir(parents=True)
        for d in [self.temp_dir, *(self.node_temp_dir(n) for n in self.workers)]:
            shutil.rmtree(d, ignore_errors=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self._start_nodes()

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = {**os.environ, **self.env, NODE_MARK: f"{self.id}/{name}"}
        if name == "head":
            env.pop("RAY_ADDRESS", None)
        log = open(self.root / f"node-{name}.log", "ab")
        self._procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, cwd=self.root)

    def start_worker(self, name: str) -> None:
        """A worker node in its own mount namespace: a private tmpfs over the cache directory, then ray start."""
        ray = str(Path(sys.executable).parent / "ray")
        temp = self.node_temp_dir(name)
        temp.mkdir(parents=True, exist_ok=True)
        script = (f'mount -t tmpfs -o size=4g tmpfs "{self.cache}" && exec {ray} start --address={self.address} '
                  f'--num-cpus={self.cpus_per_worker} --num-gpus={self.gpus_per_worker} --node-ip-address=127.0.0.1 '
                  f'--object-store-memory=400000000 '
                  f'--temp-dir={temp} --disable-usage-stats --block')
        n = self.alive_nodes()
        self._spawn(name, ["unshare", "-m", "--propagation", "private", "sh", "-c", script])
        self.wait_nodes(n + 1, timeout=120)  # one at a time

    def node_temp_dir(self, name: str) -> Path:
        """Ray's temp dir of a worker node (short: Ray's socket paths must stay under 107 bytes)."""
        return Path(f"{self.temp_dir}-{name}")

    def alive_nodes(self) -> int:
        """Alive nodes, as the GCS sees them (asked from a fresh process, not this one)."""
        code = ("import ray; ray.init(address='%s', logging_level='ERROR', log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **self.env}, capture_output=True,
                             text=True, timeout=120)
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def wait_nodes(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test cluster did not reach {n} alive nodes in {timeout:.0f} s; see "
                                   f"{self.root}/node-*.log")
            time.sleep(2)

    def node_pids(self, name: str) -> list[int]:
        """Every process of the node `name` (its environment carries the node mark)."""
        mark = f"{NODE_MARK}={self.id}/{name}".encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if mark in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of a node (a lost spot instance); its tmpfs goes with its namespace."""
        for _ in range(5):
            pids = self.node_pids(name)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        proc = self._procs.pop(name, None)
        if proc is not None:
            proc.wait(timeout=30)

    def node_path(self, name: str, path: Path) -> Path:
        """`path` as the node `name` sees it (through /proc/<pid>/root: its own mounts), for assertions."""
        pids = self.node_pids(name)
        if not pids:
            raise RuntimeError(f"node {name} has no process")
        return Path(f"/proc/{pids[0]}/root") / Path(path).relative_to("/")

    def stop(self) -> None:
        for name in [*self.workers, "head"]:
            self.kill_node(name)
        if self._moto is not None:
            self._moto.stop()
        for d in [self.temp_dir, *(self.node_temp_dir(n) for n in self.workers)]:
            shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- helpers
    def run(self, argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        """A driver command on the head (this machine's disk), with the cluster's environment."""
        return subprocess.run(argv, env={**os.environ, **self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, timeout=timeout, cwd=kw.pop("cwd", self.root), **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, env={**os.environ, **self.env, **kw.pop("env", {})}, cwd=kw.pop("cwd", self.root),
                                **kw)

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def objects(self, under: str = "") -> dict[str, dict]:
        """{key: {Size, LastModified, ETag}} of the bucket's objects under the storage prefix + `under`."""
        out, token = {}, None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            page = self.s3().list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/{under}".rstrip("/"), **kw)
            for o in page.get("Contents", []):
                out[o["Key"]] = {"Size": o["Size"], "LastModified": o["LastModified"], "ETag": o["ETag"]}
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def head(self, key: str) -> tuple:
        """(ETag, LastModified) of one object (a full key, as objects() lists it)."""
        o = self.s3().head_object(Bucket=self.bucket, Key=key)
        return o["ETag"], o["LastModified"]
