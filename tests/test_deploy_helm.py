"""The Helm chart: rendered offline by Helm's Go SDK (helm-python-sdk), every object validated against the Kubernetes
schemas of several versions (kubernetes-validate), plus contracts with the agent's own defaults and CLI."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from helpers import ROOT

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (test extra) is not installed")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra) is not installed")
yaml = pytest.importorskip("yaml")

CHART = ROOT / "deploy" / "helm" / "dynsnap"
K8S_VERSIONS = ["1.25.0", "1.29.0", "1.33.0", "1.37.0"]

VALUE_SETS = {
    "default": {},
    "gpu-pvc": {"gpu": {"enabled": True}, "storage": {"type": "pvc", "pvc": {"create": True, "size": "2Ti",
                                                                            "storageClassName": "fast"}}},
    "tcp-s3": {"agent": {"tcp": {"enabled": True, "port": 9200, "tokenSecret": "dynsnap-token"}},
               "storage": {"s3": {"url": "s3://snapshots/cluster-a", "endpoint": "https://s3.example.internal",
                                  "region": "eu-west-1", "credentialsSecret": "dynsnap-s3"}}},
    "existing-claim": {"storage": {"type": "pvc", "mountPath": "/data/dynsnap", "pvc": {"existingClaim": "shared"}},
                       "agent": {"socketDir": "/var/run/dynsnap-agent", "workers": 8,
                                 "extraEnv": {"DYNSNAP_STAGING": "target"}},
                       "serviceAccount": {"create": False, "name": "node-agents"}, "rbac": {"create": False}},
    "gpu-extra-scheduling": {"gpu": {"enabled": True}, "nodeSelector": {"pool": "inference"},
                             "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "inference",
                                              "effect": "NoSchedule"}],
                             "priorityClassName": "system-node-critical",
                             "image": {"repository": "registry.local/dynsnap", "tag": "dev", "pullPolicy": "Always"}},
}


def render(values: dict) -> dict[str, list[dict]]:
    """{kind: [objects]} of the chart rendered with ``values`` (NOTES.txt under 'NOTES')."""
    out = helm.Chart.load(str(CHART)).render(values, name="ds", namespace="dynsnap", is_install=True)
    objs: dict[str, list[dict]] = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            objs["NOTES"] = [{"text": text}]
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objs.setdefault(doc["kind"], []).append(doc)
    return objs


def _ds(objs: dict) -> dict:
    assert len(objs["DaemonSet"]) == 1
    return objs["DaemonSet"][0]


def _agent_container(objs: dict) -> dict:
    cs = _ds(objs)["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in cs] == ["agent"]
    return cs[0]


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_renders_and_validates_on_several_kubernetes_versions(name):
    objs = render(VALUE_SETS[name])
    kinds = {k for k in objs if k != "NOTES"}
    assert {"DaemonSet", "ConfigMap"} <= kinds
    for kind, items in objs.items():
        if kind == "NOTES":
            continue
        for obj in items:
            for version in K8S_VERSIONS:
                kv.validate(obj, version, strict=True)      # raises ValidationError naming the field


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_daemonset_contract(name):
    """hostPID, privileged, host /proc and /dev, selector matches labels, args the agent's CLI accepts."""
    values = VALUE_SETS[name]
    objs = render(values)
    ds = _ds(objs)
    pod = ds["spec"]["template"]["spec"]
    c = _agent_container(objs)
    assert pod["hostPID"] is True
    assert c["securityContext"]["privileged"] is True and c["securityContext"]["runAsUser"] == 0
    sel = ds["spec"]["selector"]["matchLabels"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert sel and all(labels.get(k) == v for k, v in sel.items())
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert vols["host-proc"]["hostPath"]["path"] == "/proc" and vols["host-dev"]["hostPath"]["path"] == "/dev"
    assert mounts["host-dev"]["mountPath"] == "/dev"
    assert vols["cgroup"]["hostPath"]["path"] == mounts["cgroup"]["mountPath"] == "/sys/fs/cgroup"
    assert set(mounts) == set(vols), "every volume is mounted and every mount has a volume"

    # the args are the agent's own CLI: its parser accepts them
    from dynsnap_core.cli import build_parser
    assert c["command"] == ["dynsnap"]
    a = build_parser().parse_args(c["args"])
    assert a.cmd == "agent" and a.cgroup_root == "/sys/fs/cgroup"
    sock = Path(a.socket)
    assert vols["socket-dir"]["hostPath"]["path"] == mounts["socket-dir"]["mountPath"] == str(sock.parent)
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["exec"]["command"] == ["dynsnap", "agent", "--probe", "--socket", str(sock)]
    # storage: the snapshot root is under the mounted volume, and DYNSNAP_HOME points at it
    cm = objs["ConfigMap"][0]["data"]
    home = mounts["snapshots"]["mountPath"]
    assert cm["DYNSNAP_HOME"] == home and a.root == f"{home}/snapshots"
    assert c["envFrom"][0]["configMapRef"]["name"] == objs["ConfigMap"][0]["metadata"]["name"]
    storage = values.get("storage", {})
    if storage.get("type") == "pvc":
        claim = vols["snapshots"]["persistentVolumeClaim"]["claimName"]
        if storage["pvc"].get("existingClaim"):
            assert claim == storage["pvc"]["existingClaim"] and "PersistentVolumeClaim" not in objs
        else:
            pvc = objs["PersistentVolumeClaim"][0]
            assert pvc["metadata"]["name"] == claim
            assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
            assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    else:
        assert vols["snapshots"]["hostPath"]["path"] == "/var/lib/dynsnap"
    if values.get("gpu", {}).get("enabled"):
        assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        for k, v in values.get("nodeSelector", {}).items():
            assert pod["nodeSelector"][k] == v
        for t in values.get("tolerations", []):
            assert t in pod["tolerations"]
    else:
        assert "nodeSelector" not in pod and "tolerations" not in pod
    tcp = values.get("agent", {}).get("tcp", {})
    if tcp.get("enabled"):
        assert a.listen == f"0.0.0.0:{tcp['port']}" and a.token_file == "/etc/dynsnap/token/token"
        assert vols["token"]["secret"]["secretName"] == tcp["tokenSecret"]
        assert vols["token"]["secret"]["defaultMode"] == 0o400, "the agent refuses a token others can read"
        assert mounts["token"]["mountPath"] == str(Path(a.token_file).parent)
        svc = objs["Service"][0]
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        assert svc["spec"]["ports"][0]["port"] == tcp["port"] and c["ports"][0]["name"] == "http"
    else:
        assert a.listen is None and "Service" not in objs and "token" not in vols
    s3 = storage.get("s3", {})
    if s3.get("url"):
        assert cm["DYNSNAP_STORAGE"] == s3["url"] and cm["DYNSNAP_S3_ENDPOINT"] == s3["endpoint"]
        assert {"secretRef": {"name": s3["credentialsSecret"]}} in c["envFrom"]
    else:
        assert "DYNSNAP_STORAGE" not in cm
    for k, v in values.get("agent", {}).get("extraEnv", {}).items():
        assert cm[k] == v
    assert cm["DYNSNAP_AGENT_WORKERS"] == str(values.get("agent", {}).get("workers", 4))


def test_defaults_agree_with_the_agent():
    """With default values, the chart's socket and storage are exactly where the agent looks by default."""
    import os

    from dynsnap_core.agent import DEFAULT_SOCKET
    objs = render({})
    c = _agent_container(objs)
    assert _arg(c["args"], "--socket") == DEFAULT_SOCKET
    assert os.geteuid() == 0 or pytest.skip("the agent's default home is root's")
    from dynsnap_core.snapshot import default_home
    env = os.environ.pop("DYNSNAP_HOME", None)
    try:
        assert str(default_home()) == objs["ConfigMap"][0]["data"]["DYNSNAP_HOME"] == "/var/lib/dynsnap"
    finally:
        if env is not None:
            os.environ["DYNSNAP_HOME"] = env
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    import dynsnap_core
    assert chart["appVersion"] == dynsnap_core.__version__
    assert "ghcr.io/dynsnap/dynsnap:" + dynsnap_core.__version__ == c["image"]
    notes = objs["NOTES"][0]["text"]
    assert f"--unix-socket {DEFAULT_SOCKET}" in notes


def test_rbac_and_service_account_are_minimal():
    objs = render({})
    sa = objs["ServiceAccount"][0]
    assert sa["automountServiceAccountToken"] is False
    assert _ds(objs)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert _ds(objs)["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    role = objs["Role"][0]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": [objs["ConfigMap"][0]["metadata"]["name"]], "verbs": ["get"]}]
    assert "ClusterRole" not in objs and "ClusterRoleBinding" not in objs
    rb = objs["RoleBinding"][0]
    assert rb["roleRef"]["name"] == role["metadata"]["name"]
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "dynsnap"}]


@pytest.mark.parametrize("values, message", [
    ({"agent": {"tcp": {"enabled": True}}},
     "agent.tcp.enabled needs agent.tcp.tokenSecret: the agent never serves TCP without a bearer token"),
    ({"storage": {"type": "pvc"}}, "storage.type=pvc needs storage.pvc.existingClaim or storage.pvc.create=true"),
])
def test_refused_combinations(values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize("values, where", [
    ({"agent": {"workers": 0}}, "workers"),
    ({"storage": {"type": "nfs"}}, "type"),
    ({"storage": {"s3": {"url": "http://not-s3"}}}, "url"),
    ({"agent": {"socketDir": "relative/dir"}}, "socketDir"),
    ({"agnet": {}}, "agnet"),
    ({"agent": {"tcp": {"port": 70000}}}, "port"),
])
def test_schema_rejects_bad_values(values, where):
    with pytest.raises(helm.HelmValuesError, match=where):
        helm.Chart.load(str(CHART)).validate_schema(copy.deepcopy(values))


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_is_clean(name):
    """`helm lint --strict` for every value set and each Kubernetes version: no warning, no error."""
    for version in K8S_VERSIONS:
        report = helm.lint(str(CHART), VALUE_SETS[name], strict=True, kube_version=f"v{version}")
        assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report
    bad = helm.lint(str(CHART), {"agent": {"workers": 0}}, strict=True)
    assert bad["errors"] or any(m["severity"] >= 3 for m in bad["messages"]), "lint can fail"


def test_dockerfile_installs_like_setup():
    """The image gets CRIU the way scripts/setup.sh does (criu-bundle.sh into the same prefix) and the agent extras."""
    text = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "scripts/criu-bundle.sh /opt/dynsnap/criu" in setup and "RUN scripts/criu-bundle.sh /opt/dynsnap/criu" in text
    for pkg in ("liburing-dev", "libaio-dev", "libxxhash-dev"):
        assert pkg in setup and pkg in text
    assert "'/src[agent,s3]'" in text
    assert "DYNSNAP_CRIU=/opt/dynsnap/criu/bin/criu" in text and "DYNSNAP_HOME=/var/lib/dynsnap" in text
    assert re.search(r'^CMD \["dynsnap", "agent"\]$', text, re.M)


def test_systemd_unit_matches_the_agent():
    """The systemd unit for nodes without Kubernetes: its command line is one the agent's CLI accepts, with the
    same socket and storage as the chart's defaults."""
    import configparser
    import shlex
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "deploy" / "systemd" / "dynsnap-agent.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0] == "/opt/dynsnap/venv/bin/dynsnap"           # where the Dockerfile installs it too
    from dynsnap_core.agent import DEFAULT_SOCKET
    from dynsnap_core.cli import build_parser
    a = build_parser().parse_args(argv[1:])
    chart = _agent_container(render({}))
    assert a.cmd == "agent" and a.socket == DEFAULT_SOCKET == _arg(chart["args"], "--socket")
    assert a.root == _arg(chart["args"], "--root") and a.drain == 300
    assert unit["Service"]["Environment"] == "DYNSNAP_HOME=/var/lib/dynsnap"
    assert int(unit["Service"]["TimeoutStopSec"]) > a.drain
    assert unit["Service"]["RuntimeDirectory"] == Path(DEFAULT_SOCKET).parent.name
