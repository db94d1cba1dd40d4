#!/usr/bin/env bash
# The kind demo: a cluster whose apiserver sends audit events to audit-reverser in the
# cluster, and a commit for a `kubectl create configmap`. Needs docker, kind, kubectl, git.
# Run it from anywhere; `kind delete cluster --name audit-reverser` removes it all.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${KIND_CLUSTER_NAME:-audit-reverser}
image=audit-reverser:dev
work=kind/.work
# The Service's ClusterIP (kind/kustomization.yaml), which the webhook kubeconfig names.
address=10.96.100.100

for tool in docker kind kubectl git; do
    command -v "$tool" >/dev/null || { echo "kind/up.sh needs $tool on PATH" >&2; exit 1; }
done

step() { printf '\n== %s\n' "$*"; }

step "1. Build the image"
docker build -t "$image" .

step "2. Certificates and the apiserver's webhook kubeconfig (in $work/)"
mkdir -p "$work/audit"
tool() {  # audit-reverser from the image, writing into $work as the current user
    docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/$work:/work" \
        --entrypoint audit-reverser "$image" "$@"
}
if [ ! -f "$work/certs/ca.crt" ]; then
    tool certs --out /work/certs --host "$address" \
        --host audit-reverser.audit-reverser.svc --client-name kube-apiserver
fi
tool webhook-config --url "https://$address/audit-webhook/kind" --ca /work/certs/ca.crt \
    --client-cert /work/certs/client.crt --client-key /work/certs/client.key \
    > "$work/audit/webhook.kubeconfig"
cp policy/recommended.yaml "$work/audit/policy.yaml"

step "3. The cluster, with the audit policy and webhook mounted into its apiserver"
if ! kind get clusters | grep -qx "$cluster"; then
    kind create cluster --name "$cluster" --config kind/cluster.yaml
fi
kubectl config use-context "kind-$cluster"
kind load docker-image "$image" --name "$cluster"

step "4. audit-reverser: CRDs, RBAC, Deployment, Service (deploy/ through kind/kustomization.yaml)"
kubectl apply -f deploy/base/namespace.yaml
kubectl -n audit-reverser create secret generic audit-reverser-tls \
    --from-file=tls.crt="$work/certs/server.crt" --from-file=tls.key="$work/certs/server.key" \
    --from-file=ca.crt="$work/certs/ca.crt" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -k kind/
kubectl wait --for=condition=Established --timeout=60s \
    crd/gitproviders.configbutler.ai crd/gittargets.configbutler.ai \
    crd/watchrules.configbutler.ai crd/clusterwatchrules.configbutler.ai
kubectl -n audit-reverser rollout status deployment/audit-reverser --timeout=180s

step "5. The quickstart rules: ConfigMaps and Secrets in namespace default"
kubectl apply -f kind/quickstart.yaml
kubectl wait --for=condition=Ready --timeout=120s gittarget/demo \
    || kubectl get gittarget demo -o jsonpath='{.status.conditions}{"\n"}'

step "6. A change, and its commit"
kubectl create configmap "demo-$(date +%s)" --from-literal=greeting=hello
pod=$(kubectl -n audit-reverser get pod -l app.kubernetes.io/name=audit-reverser \
    -o jsonpath='{.items[0].metadata.name}')
for _ in $(seq 30); do
    rm -rf "$work/demo.git"
    kubectl -n audit-reverser cp "$pod:/state/demo.git" "$work/demo.git" >/dev/null
    if git -C "$work/demo.git" log --format=%s main 2>/dev/null | grep -q '^\[CREATE\] v1/configmaps/default/demo-'; then
        git -C "$work/demo.git" log --format='%h %an  %ad  %s' --date=iso main
        printf '\nThe repository (a copy of /state/demo.git in the pod) is in %s.\n' "$work/demo.git"
        exit 0
    fi
    sleep 2
done
echo "no commit after 60 s; see: kubectl -n audit-reverser logs deployment/audit-reverser" >&2
exit 1
