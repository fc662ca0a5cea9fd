#!/usr/bin/env bash
# recserve's cluster drill set: the faults of drills/ that have a Kubernetes form, against a deployed recserve.
# usage: deploy/k8s/drills/cluster-drills.sh {crash|hang|operator-crash|overload} | {bad-rollout|rollover} VERSION
# Needs kubectl with a context on the cluster (namespace $NS, default recserve). The probe is perf_analyzer in a
# pod of the Triton SDK image against the client Service: perf_analyzer stops at the FIRST failed request, so a
# probe that runs to its end means zero failed requests during the fault.
set -euo pipefail
NS=${NS:-recserve}
SDK=${SDK:-nvcr.io/nvidia/tritonserver:24.10-py3-sdk}
PROBE_S=${PROBE_S:-60}
k() { kubectl -n "$NS" "$@"; }

pods() { k get pods -l app.kubernetes.io/name=recserve-triton -o jsonpath='{.items[*].metadata.name}'; }

probe_start() {  # $1 = concurrency; back-to-back perf_analyzer runs for PROBE_S seconds, stop at the first error
  k delete pod recserve-probe --ignore-not-found --wait=true >/dev/null
  k run recserve-probe --restart=Never --image="$SDK" --command -- sh -c "
    end=\$(( \$(date +%s) + $PROBE_S ))
    while [ \$(date +%s) -lt \$end ]; do
      perf_analyzer -m recommend -u recserve:8001 -i grpc --input-data zero --shape history:3 \
        --concurrency-range ${1:-4} -p 2000 || exit 1
    done"
  k wait --for=condition=Ready pod/recserve-probe --timeout=300s
}

probe_verdict() {
  k wait --for=jsonpath='{.status.phase}'=Succeeded pod/recserve-probe --timeout="$((PROBE_S + 120))s" \
    && echo "PASS: the probe ran to its end: zero failed requests" \
    || { echo "FAIL: the probe stopped on a failed request:"; k logs recserve-probe | tail -5; return 1; }
}

gates() { k get pods -l app.kubernetes.io/name=recserve-triton \
  -o custom-columns='POD:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,GOLDEN:.status.conditions[?(@.type=="recserve.io/golden-ok")].status'; }

drill_crash() {  # gpu-xid-crash: the process dies at once (force delete = no preStop, no grace)
  probe_start 4; sleep 10
  victim=$(pods | awk '{print $1}'); echo "force-deleting $victim"; date -u +%T
  k delete pod "$victim" --grace-period=0 --force
  probe_verdict; k wait --for=condition=Ready pod -l app.kubernetes.io/name=recserve-triton --timeout=600s; gates
}

drill_hang() {  # gpu-hang: the process stops answering; the operator's golden check closes the gate and deletes it
  # SIGSTOP from kubectl exec reaches tritonserver only when it is not PID 1: the drills overlay shares the pod's
  # process namespace (the cpu/gpu overlays do not: the admin key is on tritonserver's command line)
  [ "$(k get deploy recserve-triton -o jsonpath='{.spec.template.spec.shareProcessNamespace}')" = true ] || {
    echo "hang needs deploy/k8s/overlays/drills applied (kubectl apply -k deploy/k8s/overlays/drills)"; return 1; }
  probe_start 4; sleep 10
  victim=$(pods | awk '{print $1}'); echo "SIGSTOP tritonserver in $victim"; date -u +%T
  k exec "$victim" -c triton -- sh -c 'kill -STOP $(pgrep -o -x tritonserver)'
  k get events --field-selector involvedObject.name="$victim" -w & ev=$!
  probe_verdict || true; kill $ev || true; gates
}

drill_rollout() {  # $1 = version of ranker, $2 = expected result: RolledBack (bad-rollover) or Succeeded (under load)
  : "${1:?give the ranker VERSION already in the model repository (see deploy/README.md)}"
  probe_start 2; sleep 5
  cat <<YAML | k apply -f -
apiVersion: recserve.io/v1alpha1
kind: ModelRollout
metadata: {name: drill-ranker-$1}
spec: {fleet: recserve, model: ranker, version: $1, strategy: canary, steps: [50, 100], bakeSeconds: 30}
YAML
  k wait --for=jsonpath='{.status.result}'="$2" "modelrollout/drill-ranker-$1" --timeout=600s
  k get modelrollout "drill-ranker-$1" -o wide; probe_verdict
}

drill_operator_crash() {  # control-plane-crash: the operator pod dies; Triton keeps serving, the operator returns
  probe_start 4; sleep 5
  k delete pod -l app.kubernetes.io/name=recserve-operator --grace-period=0 --force
  k wait --for=condition=Ready pod -l app.kubernetes.io/name=recserve-operator --timeout=300s
  probe_verdict; k get recservefleet recserve
}

drill_overload() {  # overload: well past one pod's capacity; the HPA must add pods on queue time
  k get hpa recserve-triton
  PROBE_S=300 probe_start 64 || true
  for _ in $(seq 30); do k get hpa recserve-triton --no-headers; sleep 10; done
  k logs recserve-probe | tail -20
}

case "${1:-}" in
  crash) drill_crash ;; hang) drill_hang ;; operator-crash) drill_operator_crash ;; overload) drill_overload ;;
  bad-rollout) drill_rollout "${2:-}" RolledBack ;; rollover) drill_rollout "${2:-}" Succeeded ;;
  *) sed -n '2,6p' "$0"; exit 2 ;;
esac
