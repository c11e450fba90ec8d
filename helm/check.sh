#!/usr/bin/env bash
# Lint, render and validate the MWM Helm chart (helm/mwm), offline apart from package registries.
#
#   1. helm: ${MWM_CACHE_DIR:-$HOME/.cache/mwm}/bin/helm, built from the Go module proxy when absent
#      (HELM_VERSION, default v3.22.0; needs `go`).
#   2. helm lint --strict with the default values and with ci/*-values.yaml.
#   3. helm template of each into a temporary directory; a schema-violating value must be rejected.
#   4. validation of the rendered manifests against the Kubernetes JSON schemas vendored by the
#      kubernetes-validate package (installed into .venv if .venv/bin/pip exists, else /tmp/setup/venv),
#      strictly, for Kubernetes 1.25 and the newest it knows; KEDA resources against structural schemas.
#   5. `promtool check rules` on the alert rules the chart ships (helm/mwm/files/prometheus-rules.yaml):
#      promtool at $cache/bin/promtool, built from the Go module proxy when absent (PROMETHEUS_MODULE_VERSION,
#      default v0.315.1 = Prometheus 3.15.1).
#
# Exits non-zero on the first failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
chart="$here/mwm"
cache="${MWM_CACHE_DIR:-$HOME/.cache/mwm}"
helm="$cache/bin/helm"
helm_version="${HELM_VERSION:-v3.22.0}"
validator_pkg="kubernetes-validate==1.37.0"
# The Kubernetes minor version Helm reports by default (that of its client-go); released Helm
# binaries have it set at link time, `go install` needs it passed the same way.
helm_k8s_minor="${HELM_K8S_MINOR:-37}"

promtool="$cache/bin/promtool"
promtool_version="${PROMETHEUS_MODULE_VERSION:-v0.315.1}"

log() { printf '== %s\n' "$*"; }
die() { printf 'helm/check.sh: %s\n' "$*" >&2; exit 1; }

install_helm() {
    command -v go >/dev/null || die "helm is not at $helm and go is not installed to build it"
    log "building helm $helm_version into $cache/bin (takes a few minutes)"
    local tmp ldflags
    tmp="$(mktemp -d)"
    ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
    for pkg in pkg/lint/rules pkg/chartutil; do
        ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$helm_k8s_minor"
    done
    GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$helm_version"
    mkdir -p "$cache/bin"
    mv -f "$tmp/helm" "$helm"
    rm -rf "$tmp"
}

install_promtool() {
    command -v go >/dev/null || die "promtool is not at $promtool and go is not installed to build it"
    log "building promtool (prometheus module $promtool_version) into $cache/bin (takes several minutes)"
    # `go install pkg@version` refuses modules whose go.mod has replace directives (Prometheus has one):
    # build from a throw-away module that requires it and repeats the replace.
    local tmp replace
    tmp="$(mktemp -d)"
    (
        cd "$tmp"
        go mod init promtoolbuild >/dev/null 2>&1
        replace="$(go mod download -json "github.com/prometheus/prometheus@$promtool_version" |
            sed -n 's/.*"GoMod": "\(.*\)",*/\1/p' | xargs grep -h '^replace ' || true)"
        printf 'require github.com/prometheus/prometheus %s\n%s\n' "$promtool_version" "$replace" >> go.mod
        printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/prometheus/prometheus/cmd/promtool"\n' > tools.go
        go mod tidy >/dev/null 2>&1
        CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/promtool" github.com/prometheus/prometheus/cmd/promtool
    )
    mkdir -p "$cache/bin"
    mv -f "$tmp/promtool" "$promtool"
    rm -rf "$tmp"
}

if [[ -x "$helm" ]]; then
    log "helm: $("$helm" version --short)"
else
    install_helm
fi

if [[ -x "$repo/.venv/bin/pip" ]]; then
    venv="$repo/.venv"
else
    venv="/tmp/setup/venv"
fi
python="$venv/bin/python"
[[ -x "$python" ]] || die "no Python at $python"
if ! "$python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
    log "installing $validator_pkg into $venv"
    "$venv/bin/pip" install --quiet "$validator_pkg" pyyaml
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

values_sets=("default")
for f in "$chart"/ci/*-values.yaml; do
    [[ -e "$f" ]] && values_sets+=("$f")
done

rendered=()
for values in "${values_sets[@]}"; do
    args=()
    name="default"
    if [[ "$values" != "default" ]]; then
        args=(-f "$values")
        name="$(basename "$values" .yaml)"
    fi
    log "helm lint ($name)"
    "$helm" lint --strict "$chart" "${args[@]}"
    log "helm template ($name)"
    "$helm" template mwm "$chart" --namespace mwm "${args[@]}" > "$out/$name.yaml"
    rendered+=("$out/$name.yaml")
done

log "values.schema.json rejects bad values"
for bad in "consumers.discovery.replicas=-1" "consumers.discovry.replicas=1" "gateway.service.type=Bogus"; do
    if "$helm" template mwm "$chart" --set "$bad" > /dev/null 2>&1; then
        die "helm template accepted --set $bad"
    fi
done

log "validating the rendered manifests against the Kubernetes schemas"
"$python" "$here/validate_manifests.py" "${rendered[@]}"
if [[ ! -x "$promtool" ]]; then
    install_promtool
fi
log "promtool check rules ($("$promtool" --version 2>&1 | head -n1))"
"$promtool" check rules "$chart/files/prometheus-rules.yaml"

log "helm chart OK"
