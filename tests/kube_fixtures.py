"""Test harness for the operator: an in-memory Kubernetes API and the test playing the Deployment controller.

The API is kmock's ``KubernetesEmulator`` (PyPI ``kmock``): a real HTTP server speaking the Kubernetes REST and
watch protocol, so the operator talks to it through the official ``kubernetes`` client exactly as to a cluster.
It keeps objects in memory and runs NO controllers, no scheduler and no kubelet: ``DeploymentController`` below
does their part (creates Pod objects backed by REAL local tritonserver processes, replaces deleted ones) and the
tests say so. One fidelity fix on top of kmock: list calls honour ``labelSelector`` (equality terms), as the
real API server does.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from pathlib import Path

import kmock
from kubernetes import client

from recserve.control.runtime.triton import TritonConfig, TritonServer

NAMESPACE = "recserve"


class _Emulator(kmock.KubernetesEmulator):
    async def _serve_list(self, request):
        out = await super()._serve_list(request)
        sel = (request.params or {}).get("labelSelector")
        if sel:
            terms = dict(t.split("=", 1) for t in sel.split(",") if "=" in t)
            out["items"] = [o for o in out["items"]
                            if all((o.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in terms.items())]
        return out


class KubeEmulator:
    """kmock's emulator on a free loopback port, in its own thread and event loop; ``api`` is a real ApiClient."""

    RESOURCES = {
        "v1/pods": ("Pod", ["status"]), "v1/events": ("Event", []), "v1/secrets": ("Secret", []),
        "recserve.io/v1alpha1/recservefleets": ("RecServeFleet", ["status"]),
        "recserve.io/v1alpha1/modelrollouts": ("ModelRollout", ["status"]),
    }

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.url = ""
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with _Emulator() as h, kmock.Server(h) as srv:
                for res, (kind, subs) in self.RESOURCES.items():
                    h.resources[res] = kmock.ResourceInfo(kind=kind, namespaced=True, subresources=subs)
                self.url = str(srv.url).rstrip("/")
                self._ready.set()
                await self._stop.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self.error = exc
            self._ready.set()

    def start(self) -> KubeEmulator:
        self._thread.start()
        self._ready.wait(30)
        if self.error or not self.url:
            raise RuntimeError(f"kmock emulator did not start: {self.error!r}")
        cfg = client.Configuration()
        cfg.host = self.url
        self.api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def events(self, reason: str | None = None) -> list:
        return [e for e in self.core.list_namespaced_event(NAMESPACE).items if reason is None or e.reason == reason]


class PodServer(TritonServer):
    """A tritonserver run like the pod's container: the manifest's args replace the embedded defaults of the same
    option (restricted APIs, readiness, metrics); options the manifest does not set keep the embedded values."""

    def __init__(self, config: TritonConfig, pod_args: list[str]):
        super().__init__(config)
        self.pod_args = pod_args

    def command(self, backend_dir: Path) -> list[str]:
        names = {a.split("=", 1)[0] for a in self.pod_args}
        return [a for a in super().command(backend_dir) if a.split("=", 1)[0] not in names] + self.pod_args


class DeploymentController:
    """Plays the Deployment controller and kubelet for the rendered ``recserve-triton`` Deployment: keeps
    ``replicas`` Pod objects, each backed by a real tritonserver started with the Deployment's own container args
    (ports and the model repository path made local), and replaces a pod whose object was deleted."""

    def __init__(self, core: client.CoreV1Api, deployment: dict, repository: Path, workdir: Path, admin_key: str,
                 replicas: int = 2):
        self.core, self.deployment, self.repository = core, deployment, Path(repository)
        self.workdir, self.admin_key, self.replicas = Path(workdir), admin_key, replicas
        self.servers: dict[str, TritonServer] = {}
        self.stopped: list[str] = []
        self._n = 0

    @property
    def template(self) -> dict:
        return self.deployment["spec"]["template"]

    def container_args(self) -> tuple[list[str], list[str]]:
        """(models to load, other flags) from the manifest: the same flags a cluster pod gets."""
        c = self.template["spec"]["containers"][0]
        args = [a.replace("$(TRITON_ADMIN_KEY)", self.admin_key) for a in c["args"]]
        models = [a.split("=", 1)[1] for a in args if a.startswith("--load-model=")]
        flags = [a for a in args if not a.startswith(("--load-model=", "--model-repository="))]
        return models, flags

    def fault_dir(self, name: str) -> Path:
        return self.workdir / name / "faults"

    def pod_config(self, name: str, models: list[str]) -> TritonConfig:
        """The tritonserver of pod ``name`` (its fault switch folder made)."""
        self.fault_dir(name).mkdir(parents=True, exist_ok=True)
        return TritonConfig(model_repository=self.repository, workdir=self.workdir / name, models=models,
                            admin_key=self.admin_key, name=name,
                            extra_env={"RECSERVE_FAULT_DIR": str(self.fault_dir(name))})

    def start_pods(self, n: int) -> list[str]:
        models, flags = self.container_args()
        started = []
        for _ in range(n):
            self._n += 1
            name = f"recserve-triton-{self._n}"
            srv = PodServer(self.pod_config(name, models), flags)
            self.servers[name] = srv
            srv.start(wait=False)
            started.append(name)
        for name in started:
            self.servers[name].wait_ready()
            self._create_pod(name, self.servers[name])
        return started

    def _create_pod(self, name: str, srv: TritonServer) -> None:
        spec = copy.deepcopy(self.template["spec"])
        local = {"http": srv.config.http_port, "grpc": srv.config.grpc_port, "metrics": srv.config.metrics_port}
        for p in spec["containers"][0]["ports"]:
            p["containerPort"] = local[p["name"]]
        for c in spec["containers"][1:]:  # the models-sync sidecar the operator asks before it loads a version
            for p in c.get("ports") or []:
                if p["name"] == "modelsync":
                    p["containerPort"] = self.sidecar_port()
        self.core.create_namespaced_pod(NAMESPACE, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": dict(self.template["metadata"]["labels"]),
                         "uid": f"uid-{name}"},
            "spec": spec,
            "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": []}})

    def reconcile(self) -> list[str]:
        """Stop the process of every deleted Pod object and start replacements up to ``replicas``."""
        labels = self.template["metadata"]["labels"]
        sel = ",".join(f"{k}={v}" for k, v in labels.items())
        alive = {p.metadata.name for p in self.core.list_namespaced_pod(NAMESPACE, label_selector=sel).items}
        for name in [n for n in self.servers if n not in alive]:
            self.servers.pop(name).stop()
            self.stopped.append(name)
        missing = self.replicas - len(self.servers)
        return self.start_pods(missing) if missing > 0 else []

    def sidecar_port(self) -> int:
        """One real models-sync sidecar (``POST /sync``) for every pod, over a store published from the test's
        repository and filling that same repository: what it holds is verified and left as it is."""
        from recserve.control.backup.targets import PathStore
        from recserve.control.kube.modelsync import ModelSync, publish, serve

        if getattr(self, "_sidecar", None) is None:
            store = PathStore(self.workdir / "models-store")
            publish(self.repository, store)
            self._sidecar = serve(ModelSync(store, self.repository), 0, host="127.0.0.1")
        return self._sidecar.server_address[1]

    def close(self) -> None:
        if getattr(self, "_sidecar", None) is not None:
            self._sidecar.shutdown()
        for srv in self.servers.values():
            srv.stop()
        self.servers.clear()
