# Start, stop and describe the Argo stack (sourced by scripts/argo-stack, which sets REPO, the
# versions, *_DIR of the binaries, die and note). See scripts/argo-stack for the commands.

OFFSET="${MWM_SERVICES_PORT_OFFSET:-0}"
[[ "$OFFSET" =~ ^[0-9]+$ ]] && [ "$OFFSET" -le 29000 ] ||
    die "MWM_SERVICES_PORT_OFFSET must be an integer from 0 to 29000, not '$OFFSET'"
SUFFIX=""
[ "$OFFSET" -eq 0 ] || SUFFIX="-o$OFFSET"
STATE="${MWM_STATE_DIR:-$REPO/.state$SUFFIX}/argo"
TIMEOUT="${MWM_SERVICES_TIMEOUT:-90}"
HERE="$REPO/scripts/argo-stack.d"
NAMESPACE="${MWM_ARGO_STACK_NAMESPACE:-argo}"

ETCD_PORT=$((2379 + OFFSET))
ETCD_PEER_PORT=$((2380 + OFFSET))
API_PORT=$((6443 + OFFSET))
ARGO_PORT=$((2746 + OFFSET))
KWOK_PORT=$((10247 + OFFSET))
CONTROLLER_HEALTH_PORT=6060 # fixed upstream: one Argo stack per machine
API_URL="https://127.0.0.1:$API_PORT"
ARGO_URL="https://127.0.0.1:$ARGO_PORT"
KUBECONFIG_FILE="$STATE/kubeconfig"
SERVICES=(etcd apiserver scheduler controller-manager kwok controller server)

mkdir -p "$STATE/logs" "$STATE/run"

bin_of() { # service -> binary
    case "$1" in
    etcd) echo "$ETCD_DIR/etcd" ;;
    apiserver) echo "$K8S_DIR/kube-apiserver" ;;
    scheduler) echo "$K8S_DIR/kube-scheduler" ;;
    controller-manager) echo "$K8S_DIR/kube-controller-manager" ;;
    kwok) echo "$KWOK_DIR/kwok" ;;
    controller) echo "$ARGO_DIR/workflow-controller" ;;
    server) echo "$ARGO_DIR/argo" ;;
    esac
}

kubectl() { "$K8S_DIR/kubectl" --kubeconfig="$KUBECONFIG_FILE" "$@"; }

pid_alive() { # service
    local pid
    pid="$(cat "$STATE/run/$1.pid" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

admin_token() { cat "$STATE/pki/admin.token"; }

# Wait until "$@" succeeds, or fail with the tail of the service's log.
wait_for() { # service cmd...
    local name="$1" deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        if ! pid_alive "$name" || [ "$SECONDS" -ge "$deadline" ]; then
            note "$name did not come up; last lines of $STATE/logs/$name.log:"
            tail -n 30 "$STATE/logs/$name.log" >&2 || true
            return 1
        fi
        sleep 0.3
    done
}

# A daemon in its own session (a test's process group signal must not reach it), logging to a file.
spawn() { # service env... -- cmd...
    local name="$1"
    shift
    local envs=()
    while [ "$1" != "--" ]; do
        envs+=("$1")
        shift
    done
    shift
    env "${envs[@]}" setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/run/$name.pid"
}

# ---------------------------------------------------------------- keys, tokens, kubeconfig (once)
pki() {
    local dir="$STATE/pki"
    [ -f "$dir/.complete" ] && return 0
    rm -rf "$dir" && mkdir -p "$dir" && chmod 700 "$dir"
    (
        cd "$dir"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
            -subj "/CN=mwm-test-ca" -keyout ca.key -out ca.crt
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=kube-apiserver" \
            -keyout apiserver.key -out apiserver.csr
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' >san.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile san.ext -out apiserver.crt
        # The service-account token signing key (TokenRequest tokens for the chart's accounts).
        openssl genrsa -out sa.key 2048
        openssl rsa -in sa.key -pubout -out sa.pub
        # A static token in system:masters for the stack's own components and the test harness.
        head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >admin.token
        printf '%s,mwm-admin,mwm-admin,"system:masters"\n' "$(cat admin.token)" >tokens.csv
    ) >"$STATE/logs/pki.log" 2>&1 || die "key generation failed: $(tail -n 5 "$STATE/logs/pki.log")"
    touch "$dir/.complete"
}

write_kubeconfig() {
    cat >"$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mwm
  cluster: {server: "$API_URL", certificate-authority: "$STATE/pki/ca.crt"}
users:
- name: mwm-admin
  user: {token: "$(admin_token)"}
contexts:
- name: mwm
  context: {cluster: mwm, user: mwm-admin, namespace: $NAMESPACE}
current-context: mwm
EOF
    chmod 600 "$KUBECONFIG_FILE"
}

# ---------------------------------------------------------------- services
ready() { # service: does it answer?
    case "$1" in
    etcd) curl -fsS "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"' ;;
    apiserver) curl -fsS --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $(admin_token)" "$API_URL/readyz" ;;
    scheduler | controller-manager) pid_alive "$1" ;;
    kwok) [ "$(kubectl get node kwok-node-0 -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ] ;;
    controller) curl -fsS "http://127.0.0.1:$CONTROLLER_HEALTH_PORT/healthz" ;;
    # The first POST answered 503 even after /api/v1/version did: a list call is the real readiness.
    server) curl -fsS --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $(admin_token)" "$ARGO_URL/api/v1/workflows/$NAMESPACE" ;;
    esac
}

start_one() { # service
    local name="$1" bin
    bin="$(bin_of "$name")"
    [ -x "$bin" ] || die "$bin is missing: run 'bash scripts/argo-stack build' first"
    if pid_alive "$name" && ready "$name" >/dev/null 2>&1; then return 0; fi
    pid_alive "$name" && stop_one "$name"
    case "$name" in
    etcd)
        spawn etcd -- "$bin" --name=mwm --data-dir="$STATE/etcd" --unsafe-no-fsync \
            --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
            --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
            --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
            --initial-cluster="mwm=http://127.0.0.1:$ETCD_PEER_PORT"
        ;;
    apiserver)
        # No node-lifecycle controller runs, so the not-ready taint would never be lifted
        # (TaintNodesByCondition off); no pod gets a token mounted (ServiceAccount off): nothing runs in them.
        spawn apiserver -- "$bin" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
            --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
            --tls-cert-file="$STATE/pki/apiserver.crt" --tls-private-key-file="$STATE/pki/apiserver.key" \
            --token-auth-file="$STATE/pki/tokens.csv" --authorization-mode=RBAC \
            --service-account-issuer=https://kubernetes.default.svc.cluster.local \
            --service-account-key-file="$STATE/pki/sa.pub" --service-account-signing-key-file="$STATE/pki/sa.key" \
            --service-cluster-ip-range=10.96.0.0/16 --endpoint-reconciler-type=none \
            --disable-admission-plugins=ServiceAccount,TaintNodesByCondition --enable-priority-and-fairness=false
        ;;
    scheduler)
        spawn scheduler -- "$bin" --kubeconfig="$KUBECONFIG_FILE" --secure-port=0 --leader-elect=false
        ;;
    controller-manager)
        # Deployments, ReplicaSets and StatefulSets make the chart's pods; the volume binder binds the
        # gateway's spool claims (and the protection controllers let them go); the garbage collector
        # deletes a deleted workflow's pods; namespace deletion and default service accounts for the tests.
        spawn controller-manager -- "$bin" --kubeconfig="$KUBECONFIG_FILE" --secure-port=0 --leader-elect=false \
            --controllers=garbagecollector,namespace,serviceaccount,deployment,replicaset,statefulset,persistentvolume-binder,pvc-protection,pv-protection \
            --use-service-account-credentials=false
        ;;
    kwok)
        # Never enable kwok's ClusterExec: Argo's `kill` would run on this machine.
        spawn kwok -- "$bin" --kubeconfig="$KUBECONFIG_FILE" --config="$HERE/kwok-stages.yaml" \
            --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
            --node-ip=127.0.0.1 --cidr=10.0.0.1/24 --server-address="127.0.0.1:$KWOK_PORT"
        ;;
    controller)
        if port_open "$CONTROLLER_HEALTH_PORT"; then
            die "port $CONTROLLER_HEALTH_PORT (workflow-controller health, fixed) is taken: is another Argo stack running?"
        fi
        # A 1 s requeue finishes a workflow in ~2 s instead of ~10 s.
        spawn controller LEADER_ELECTION_DISABLE=true DEFAULT_REQUEUE_TIME=1s -- "$bin" \
            --kubeconfig="$KUBECONFIG_FILE" --namespaced --namespace="$NAMESPACE" \
            --configmap=workflow-controller-configmap --executor-image="quay.io/argoproj/argoexec:$ARGO_VERSION"
        ;;
    server)
        # Client mode: every request carries a Kubernetes bearer token, checked by the API server (RBAC).
        # TLS with a certificate of the stack's CA (the secret made in bootstrap), as in a cluster.
        # Client mode builds each request's REST config from $KUBECONFIG (the flag is not enough).
        spawn server KUBECONFIG="$KUBECONFIG_FILE" -- "$bin" server --kubeconfig="$KUBECONFIG_FILE" --namespace="$NAMESPACE" \
            --auth-mode=client --secure=true --tls-certificate-secret-name=argo-server-tls --port="$ARGO_PORT"
        ;;
    esac
    wait_for "$name" ready "$name"
}

stop_one() { # service
    local pid i
    pid="$(cat "$STATE/run/$1.pid" 2>/dev/null)" || return 0
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/run/$1.pid"
}

# CRDs, the namespace, the fake node, the controller's config map, the Argo Server's TLS secret
# (idempotent).
bootstrap() {
    kubectl apply --server-side --force-conflicts -f "$ARGO_DIR/crds" >>"$STATE/logs/bootstrap.log" 2>&1 &&
        kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >>"$STATE/logs/bootstrap.log" 2>&1 &&
        kubectl apply -f "$HERE/node.yaml" >>"$STATE/logs/bootstrap.log" 2>&1 &&
        sed "s/namespace: argo/namespace: $NAMESPACE/" "$HERE/wfc-configmap.yaml" | kubectl apply -f - >>"$STATE/logs/bootstrap.log" 2>&1 &&
        kubectl -n "$NAMESPACE" create secret tls argo-server-tls --cert="$STATE/pki/apiserver.crt" \
            --key="$STATE/pki/apiserver.key" --dry-run=client -o yaml | kubectl apply -f - >>"$STATE/logs/bootstrap.log" 2>&1 ||
        die "bootstrap failed: $(tail -n 10 "$STATE/logs/bootstrap.log")"
    kubectl wait --for=condition=Established crd --all --timeout=60s >>"$STATE/logs/bootstrap.log" 2>&1 ||
        die "CRDs not established: $(tail -n 10 "$STATE/logs/bootstrap.log")"
}

cmd_env() {
    cat <<EOF
MWM_ARGO_STACK_STATE=$STATE
MWM_ARGO_STACK_NAMESPACE=$NAMESPACE
MWM_ARGO_STACK_KUBE_URL=$API_URL
MWM_ARGO_STACK_KUBE_CA=$STATE/pki/ca.crt
MWM_ARGO_STACK_KUBE_TOKEN=$(admin_token 2>/dev/null)
MWM_ARGO_STACK_KUBECONFIG=$KUBECONFIG_FILE
MWM_ARGO_STACK_KUBECTL=$K8S_DIR/kubectl
MWM_ARGO_STACK_KEDA_CRDS=$KEDA_DIR
MWM_ARGO_STACK_ARGO_URL=$ARGO_URL
MWM_ARGO_STACK_ARGO_CA=$STATE/pki/ca.crt
EOF
}

cmd_up() {
    all_built || die "not built: run 'bash scripts/argo-stack build' first (20-30 min, once)"
    pki
    write_kubeconfig
    start_one etcd
    start_one apiserver
    bootstrap
    local name
    for name in scheduler controller-manager kwok controller server; do
        start_one "$name"
    done
}

cmd_status() {
    local name rc=0
    for name in "${SERVICES[@]}"; do
        if pid_alive "$name" && ready "$name" >/dev/null 2>&1; then
            echo "$name: up"
        else
            echo "$name: down"
            rc=1
        fi
    done
    return "$rc"
}

cmd_down() {
    local i
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
        stop_one "${SERVICES[$i]}"
    done
}

known() { [[ " ${SERVICES[*]} " == *" $1 "* ]] || die "unknown service '$1' (one of: ${SERVICES[*]})"; }

all_built() {
    local dir
    for dir in "$ETCD_DIR" "$K8S_DIR" "$KWOK_DIR" "$ARGO_DIR" "$KEDA_DIR"; do
        built "$dir" || return 1
    done
}

# Is a stack of another offset (or state dir) running? Its controller holds the fixed health port.
held_elsewhere() { ! pid_alive controller && port_open "$CONTROLLER_HEALTH_PORT"; }

case "${1:-}" in
built) all_built ;;
elsewhere) held_elsewhere ;;
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
env) cmd_env ;;
start) known "${2:-}" && start_one "$2" ;;
stop) known "${2:-}" && stop_one "$2" ;;
restart) known "${2:-}" && stop_one "$2" && start_one "$2" ;;
*) die "usage: scripts/argo-stack build|up|down|status|env|start NAME|stop NAME|restart NAME" ;;
esac
