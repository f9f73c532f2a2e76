"""Renders the Kustomize base and overlays and checks them without a cluster or kubectl.

- Rendering: the Kustomize features these manifests use (resources, configMapGenerator,
  patches as strategic-merge files, replicas, images), done here because neither kustomize nor
  kubectl comes from the package registries this project installs from. Any other field in a
  kustomization.yaml is an error, so this renderer never silently differs from Kustomize.
- Schema: every rendered object against the Kubernetes OpenAPI schemas shipped by the
  `kubernetes-validate` package, strictly (an unknown field fails).
- References: volumes, ConfigMaps, Secrets and their keys, probe ports, and the agreement between
  the Deployment and Sluice's policy (the policy file's mount, the CA's mount, HTTPS_PROXY's port).
- The policy itself: `sluice check` on each rendered policy, with a test CA where the CA Secret
  would be mounted.
- deploy/Dockerfile: multi-stage, runs as a numeric non-root user, copies files that exist.

Usage: python deploy/kubernetes/validate.py [SLUICE_BIN]
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import dockerfile
import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KUSTOMIZATIONS = [HERE / "base", HERE / "overlays" / "redis"]
KUBERNETES_VERSION = "1.30.0"  # the oldest with the preStop `sleep` action (native sidecars: 1.29)
# Created by the operator, never committed (it holds the CA's private key): see the README.
EXTERNAL_SECRETS = {"sluice-ca": {"tls.crt", "tls.key", "ca.crt"}}
SIDECAR = "sluice"
APP_TRUST_VARIABLES = ["HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"]
# Strategic merge: lists of objects merged by this key (Kubernetes' patchMergeKey); others replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "envFrom": None,
    "ports": "containerPort",
    "volumeMounts": "mountPath",
}
SUPPORTED = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "replicas", "images"}


class Invalid(Exception):
    pass


def load_documents(path: Path) -> list[dict]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


def key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def merge(base, patch, field: str | None = None):
    """A strategic-merge patch, for maps and the keyed lists in MERGE_KEYS."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for name, value in patch.items():
            if name.startswith("$"):
                raise Invalid(f"patch directive {name} is not supported by this renderer")
            merged[name] = merge(base[name], value, name) if name in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and MERGE_KEYS.get(field):
        merge_key = MERGE_KEYS[field]
        merged = list(base)
        for item in patch:
            at = next((i for i, old in enumerate(merged) if old.get(merge_key) == item.get(merge_key)), None)
            if at is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[at] = merge(merged[at], item)
        return merged
    return copy.deepcopy(patch)


def generated_config_map(folder: Path, spec: dict) -> dict:
    unknown = set(spec) - {"name", "files", "behavior", "options"}
    if unknown or set(spec.get("options", {})) - {"disableNameSuffixHash"}:
        raise Invalid(f"{folder}: configMapGenerator fields not supported here: {unknown}")
    if not spec.get("options", {}).get("disableNameSuffixHash"):
        # A hashed name would need every reference rewritten; these manifests never want one
        # (a new name would roll the pods instead of letting Sluice reload).
        raise Invalid(f"{folder}: configMapGenerator {spec['name']} must set disableNameSuffixHash")
    data = {}
    for entry in spec.get("files", []):
        name, _, source = entry.partition("=")
        data[name] = (folder / (source or name)).read_text()
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": spec["name"]}, "data": data}


def render(folder: Path) -> list[dict]:
    """`kustomize build folder`, for the features named in SUPPORTED."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise Invalid(f"{folder}/kustomization.yaml: not supported by this renderer: {sorted(unknown)}")
    objects: dict[tuple[str, str], dict] = {}

    def add(obj: dict, replace: bool = False) -> None:
        if key(obj) in objects and not replace:
            raise Invalid(f"{folder}: {key(obj)} defined twice")
        objects[key(obj)] = obj

    for resource in kustomization.get("resources", []):
        path = folder / resource
        for obj in render(path) if path.is_dir() else load_documents(path):
            add(obj)
    for spec in kustomization.get("configMapGenerator", []):
        generated = generated_config_map(folder, spec)
        behavior = spec.get("behavior", "create")
        exists = key(generated) in objects
        if behavior == "create" and exists or behavior in ("replace", "merge") and not exists:
            raise Invalid(f"{folder}: configMapGenerator {spec['name']}: behavior {behavior} does not fit")
        if behavior == "merge":
            generated = merge(objects[key(generated)], generated)
        add(generated, replace=behavior != "create")
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise Invalid(f"{folder}: only `patches: [{{path: …}}]` is supported, not {patch}")
        for change in load_documents(folder / patch["path"]):
            if key(change) not in objects:
                raise Invalid(f"{folder}: patch {patch['path']} targets missing {key(change)}")
            objects[key(change)] = merge(objects[key(change)], change)
    for replicas in kustomization.get("replicas", []):
        target = objects.get(("Deployment", replicas["name"]))
        if target is None:
            raise Invalid(f"{folder}: replicas for missing Deployment {replicas['name']}")
        target["spec"]["replicas"] = replicas["count"]
    for image in kustomization.get("images", []):
        for obj in objects.values():
            for container in pod_containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return list(objects.values())


def pod_containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def check_references(objects: list[dict]) -> None:
    by_key = {key(obj): obj for obj in objects}
    secrets = {name: set(keys) for name, keys in EXTERNAL_SECRETS.items()}
    for obj in objects:
        if obj["kind"] == "Secret":
            secrets[obj["metadata"]["name"]] = set(obj.get("stringData", {})) | set(obj.get("data", {}))
    for deployment in (obj for obj in objects if obj["kind"] == "Deployment"):
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in by_key:
                raise Invalid(f"{name}: volume {volume['name']}: no ConfigMap {volume['configMap']['name']}")
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                if secret not in secrets:
                    raise Invalid(f"{name}: volume {volume['name']}: no Secret {secret}")
                for item in volume["secret"].get("items", []):
                    if item["key"] not in secrets[secret]:
                        raise Invalid(f"{name}: volume {volume['name']}: Secret {secret} has no key {item['key']}")
        for container in pod_containers(deployment):
            where = f"{name}/{container['name']}"
            if "requests" not in container.get("resources", {}):
                raise Invalid(f"{where}: no resource requests")
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    raise Invalid(f"{where}: mounts unknown volume {mount['name']}")
            for source in container.get("envFrom", []):
                if source["secretRef"]["name"] not in secrets:
                    raise Invalid(f"{where}: envFrom unknown Secret {source['secretRef']['name']}")
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in secrets.get(ref["name"], set()):
                    raise Invalid(f"{where}: env {variable['name']}: no Secret key {ref['name']}/{ref['key']}")
            ports = {port["name"] for port in container.get("ports", []) if "name" in port}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                handler = container.get(probe, {}).get("httpGet") or container.get(probe, {}).get("tcpSocket")
                if handler and isinstance(handler["port"], str) and handler["port"] not in ports:
                    raise Invalid(f"{where}: {probe} on undeclared port {handler['port']}")


def sidecar_and_policy(objects: list[dict]) -> tuple[dict, dict, dict, str]:
    """The app Deployment's Sluice container, the app container, the policy, and its text."""
    deployment = next(obj for obj in objects if obj["kind"] == "Deployment" and any(
        c["name"] == SIDECAR for c in obj["spec"]["template"]["spec"].get("initContainers", [])))
    spec = deployment["spec"]["template"]["spec"]
    sidecar = next(c for c in spec["initContainers"] if c["name"] == SIDECAR)
    if sidecar.get("restartPolicy") != "Always":
        raise Invalid("the sluice init container must have restartPolicy: Always (a native sidecar)")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe not in sidecar:
            raise Invalid(f"the sluice container has no {probe}")
    if sidecar["readinessProbe"]["httpGet"]["path"] != "/readyz" or sidecar["livenessProbe"]["httpGet"]["path"] != "/healthz":
        raise Invalid("probes must use the admin listener's /readyz and /healthz")
    if "preStop" not in sidecar.get("lifecycle", {}):
        raise Invalid("the sluice container has no preStop hook")
    if not sidecar["securityContext"].get("runAsNonRoot"):
        raise Invalid("the sluice container must run as non-root")
    app = spec["containers"][0]
    env = {variable["name"]: variable.get("value") for variable in app.get("env", [])}
    missing = [name for name in APP_TRUST_VARIABLES if name not in env]
    if missing:
        raise Invalid(f"the app container lacks {missing}")
    policy_path = Path(sidecar["args"][sidecar["args"].index("-c") + 1])
    policy_volume = next(m["name"] for m in sidecar["volumeMounts"] if Path(m["mountPath"]) == policy_path.parent)
    config_map = next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == policy_volume)
    text = next(o for o in objects if key(o) == ("ConfigMap", config_map))["data"][policy_path.name]
    policy = yaml.safe_load(text)
    forward_port = policy["listen"]["forward"].rsplit(":", 1)[1]
    if not env["HTTPS_PROXY"].endswith(f":{forward_port}"):
        raise Invalid(f"HTTPS_PROXY {env['HTTPS_PROXY']} is not listen.forward ({policy['listen']['forward']})")
    ca_folder = Path(policy["forward"]["ca"]["cert_file"]).parent
    if not any(Path(m["mountPath"]) == ca_folder for m in sidecar["volumeMounts"]):
        raise Invalid(f"nothing is mounted at {ca_folder}, where the policy reads its CA")
    return sidecar, app, policy, text


def sluice_check(sluice: Path, policy: dict, text: str) -> str:
    """`sluice check` on the policy, with a test CA where the CA Secret would be mounted."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        ca = policy["forward"]["ca"]
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=validate.py test CA"],
            cwd=folder, check=True, capture_output=True)
        text = text.replace(ca["cert_file"], str(folder / "ca.pem")).replace(ca["key_file"], str(folder / "ca.key"))
        (folder / "sluice.yaml").write_text(text)
        env = dict(os.environ, OPENAI_API_KEY="sk-test", ANTHROPIC_API_KEY="sk-ant-test", REDIS_PASSWORD="test")
        result = subprocess.run([str(sluice), "check", str(folder / "sluice.yaml")], env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise Invalid(f"sluice check: {result.stderr.strip()}")
        return result.stdout.strip()


def check_dockerfile(path: Path) -> None:
    commands = dockerfile.parse_file(str(path))
    stages = [c for c in commands if c.cmd.upper() == "FROM"]
    if len(stages) < 2:
        raise Invalid(f"{path}: not a multi-stage build")
    final = commands[commands.index(stages[-1]):]
    users = [c.value[0] for c in final if c.cmd.upper() == "USER"]
    if not users or not users[-1].split(":")[0].isdigit() or users[-1].split(":")[0] == "0":
        raise Invalid(f"{path}: the final stage must run as a numeric non-root USER, not {users}")
    for command in final:
        if command.cmd.upper() == "COPY" and not any(flag.startswith("--from") for flag in command.flags):
            for source in command.value[:-1]:
                if not (ROOT / source).exists():
                    raise Invalid(f"{path}: COPY {source}: no such file")


def main() -> int:
    sluice = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target" / "debug" / "sluice")
    passed, failed = 0, 0

    def outcome(name: str, check) -> None:
        nonlocal passed, failed
        try:
            detail = check()
            passed += 1
            print(f"ok      {name}" + (f": {detail}" if detail else ""))
        except (Invalid, kubernetes_validate.ValidationError, OSError, KeyError, StopIteration) as error:
            failed += 1
            print(f"FAILED  {name}: {type(error).__name__}: {error}")

    for folder in KUSTOMIZATIONS:
        label = folder.relative_to(ROOT)
        try:
            objects = render(folder)
        except (Invalid, OSError, KeyError) as error:
            failed += 1
            print(f"FAILED  {label}: render: {error}")
            continue
        for obj in objects:
            outcome(f"{label}: {obj['kind']}/{obj['metadata']['name']} schema {KUBERNETES_VERSION}",
                    lambda obj=obj: kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True) and None)
        outcome(f"{label}: references", lambda objects=objects: check_references(objects))

        def policy_checks(objects=objects):
            _, _, policy, text = sidecar_and_policy(objects)
            return sluice_check(sluice, policy, text)

        outcome(f"{label}: sidecar, app environment and policy", policy_checks)
    outcome("deploy/Dockerfile", lambda: check_dockerfile(ROOT / "deploy" / "Dockerfile"))
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
