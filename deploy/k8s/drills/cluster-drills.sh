#!/usr/bin/env bash
# recserve's cluster drill set: the faults of drills/ that have a Kubernetes form, against a deployed recserve.
# usage: deploy/k8s/drills/cluster-drills.sh {crash|hang|operator-crash|overload} | {bad-rollout|rollover} VERSION
# Needs kubectl with a context on the cluster (namespace $NS, default recserve). The probe is perf_analyzer in a
# pod of the Triton SDK image against the client Service: perf_analyzer stops at the FIRST failed request, so a
# probe that runs to its end means zero failed requests during the fault.
# Every drill ends in a verdict line (PASS/FAIL: ...) and the verdict is the exit code: 0 only when every check of
# the drill passed, 1 otherwise (2: usage). tests/test_kube_units.py runs each drill against a stubbed kubectl.
set -euo pipefail
NS=${NS:-recserve}
SDK=${SDK:-nvcr.io/nvidia/tritonserver:24.10-py3-sdk}
PROBE_S=${PROBE_S:-60}
DETECT_S=${DETECT_S:-120}     # hang: the operator must close the gate and delete the stopped pod within this
SCALE_S=${SCALE_S:-300}       # overload: the HPA must add a pod within this
k() { kubectl -n "$NS" "$@"; }
FAILED=()
fail() { echo "FAIL: $*"; FAILED+=("$*"); }
verdict() {  # the drill's exit code
  if [ ${#FAILED[@]} -eq 0 ]; then echo "VERDICT $1: PASS"; return 0; fi
  echo "VERDICT $1: FAIL (${#FAILED[@]}): ${FAILED[*]}"; return 1
}

pods() { k get pods -l app.kubernetes.io/name=recserve-triton -o jsonpath='{.items[*].metadata.name}'; }

# The probe pod meets the namespace's "restricted" Pod Security Standard; its label is what the drills overlay's
# NetworkPolicy admits to the Triton pods.
PROBE_OVERRIDES='{"spec":{"securityContext":{"runAsNonRoot":true,"runAsUser":1000,"seccompProfile":{"type":"RuntimeDefault"}},'
PROBE_OVERRIDES+='"containers":[{"name":"recserve-probe","securityContext":{"allowPrivilegeEscalation":false,'
PROBE_OVERRIDES+='"capabilities":{"drop":["ALL"]}}}]}}'

probe_start() {  # $1 = concurrency; back-to-back perf_analyzer runs for PROBE_S seconds, stop at the first error
  k delete pod recserve-probe --ignore-not-found --wait=true >/dev/null
  k run recserve-probe --restart=Never --image="$SDK" --labels=recserve.io/role=drill-probe \
    --override-type=strategic --overrides="$PROBE_OVERRIDES" --command -- sh -c "
    end=\$(( \$(date +%s) + $PROBE_S ))
    while [ \$(date +%s) -lt \$end ]; do
      perf_analyzer -m recommend -u recserve:8001 -i grpc --input-data zero --shape history:3 \
        --concurrency-range ${1:-4} -p 2000 || exit 1
    done"
  k wait --for=condition=Ready pod/recserve-probe --timeout=300s
}

probe_verdict() {  # records a failure (never exits): the drill goes on to its other checks and its verdict
  if k wait --for=jsonpath='{.status.phase}'=Succeeded pod/recserve-probe --timeout="$((PROBE_S + 120))s"; then
    echo "PASS: the probe ran to its end: zero failed requests"
  else
    fail "the probe stopped on a failed request"; k logs recserve-probe | tail -5 || true
  fi
}

all_ready() {  # every Triton pod Ready (probes and the golden gate) again
  k wait --for=condition=Ready pod -l app.kubernetes.io/name=recserve-triton --timeout="${1:-600}s" \
    || fail "Triton pods not all Ready within ${1:-600}s"
}

gates() { k get pods -l app.kubernetes.io/name=recserve-triton \
  -o custom-columns='POD:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,GOLDEN:.status.conditions[?(@.type=="recserve.io/golden-ok")].status'; }

drill_crash() {  # gpu-xid-crash: the process dies at once (force delete = no preStop, no grace)
  probe_start 4 || fail "the probe did not start"; sleep 10
  victim=$(pods | awk '{print $1}'); echo "force-deleting $victim"; date -u +%T
  k delete pod "$victim" --grace-period=0 --force || fail "could not delete $victim"
  probe_verdict; all_ready 600; gates || true
  verdict crash
}

drill_hang() {  # gpu-hang: the process stops answering; the operator's golden check closes the gate and deletes it
  # SIGSTOP from kubectl exec reaches tritonserver only when it is not PID 1: the drills overlay shares the pod's
  # process namespace (the cpu/gpu overlays do not: the admin key is on tritonserver's command line)
  [ "$(k get deploy recserve-triton -o jsonpath='{.spec.template.spec.shareProcessNamespace}')" = true ] || {
    fail "hang needs deploy/k8s/overlays/drills applied (kubectl apply -k deploy/k8s/overlays/drills)"
    verdict hang; return; }
  probe_start 4 || fail "the probe did not start"; sleep 10
  victim=$(pods | awk '{print $1}'); echo "SIGSTOP tritonserver in $victim"; date -u +%T
  k exec "$victim" -c triton -- sh -c 'kill -STOP $(pgrep -o -x tritonserver)' || fail "could not stop $victim"
  # the verdict: the operator took the hung pod out (PodDeleted) within DETECT_S, and the fleet is whole again.
  # Requests already sent to the hung pod before its gate closed may fail: the probe is reported, not judged.
  deadline=$(( $(date +%s) + DETECT_S )); deleted=""
  while [ "$(date +%s)" -lt "$deadline" ]; do
    deleted=$(k get events --field-selector involvedObject.name="$victim",reason=PodDeleted -o name || true)
    [ -n "$deleted" ] && break; sleep 5
  done
  if [ -n "$deleted" ]; then echo "PASS: the operator deleted the hung pod $victim"
  else fail "no PodDeleted event for $victim within ${DETECT_S}s: the golden check did not take it out"; fi
  k wait --for=jsonpath='{.status.phase}'=Succeeded pod/recserve-probe --timeout="$((PROBE_S + 120))s" \
    && echo "probe: zero failed requests" || echo "probe: stopped on a failed request (requests the hung pod held)"
  all_ready 600; gates || true
  verdict hang
}

drill_rollout() {  # $1 = version of ranker, $2 = expected result: RolledBack (bad-rollover) or Succeeded (under load)
  : "${1:?give the ranker VERSION already in the model repository (see deploy/README.md)}"
  probe_start 2 || fail "the probe did not start"; sleep 5
  cat <<YAML | k apply -f - || fail "could not create ModelRollout drill-ranker-$1"
apiVersion: recserve.io/v1alpha1
kind: ModelRollout
metadata: {name: drill-ranker-$1}
spec: {fleet: recserve, model: ranker, version: $1, strategy: canary, steps: [50, 100], bakeSeconds: 30}
YAML
  k wait --for=jsonpath='{.status.result}'="$2" "modelrollout/drill-ranker-$1" --timeout=600s \
    || fail "ModelRollout drill-ranker-$1 did not end $2"
  k get modelrollout "drill-ranker-$1" -o wide || true; probe_verdict
  verdict "rollout-$2"
}

drill_operator_crash() {  # control-plane-crash: the operator pod dies; Triton keeps serving, the operator returns
  probe_start 4 || fail "the probe did not start"; sleep 5
  k delete pod -l app.kubernetes.io/name=recserve-operator --grace-period=0 --force || fail "could not delete it"
  k wait --for=condition=Ready pod -l app.kubernetes.io/name=recserve-operator --timeout=300s \
    || fail "the operator pod not Ready within 300s"
  probe_verdict
  k wait --for=condition=Ready recservefleet/recserve --timeout=300s || fail "the RecServeFleet not Ready again"
  k get recservefleet recserve || true
  verdict operator-crash
}

hpa_desired() { k get hpa recserve-triton -o jsonpath='{.status.desiredReplicas}'; }

drill_overload() {  # overload: well past one pod's capacity; the HPA must add pods on queue time, nothing may fail
  start=$(hpa_desired || true); start=${start:-0}; echo "HPA desired replicas before: $start"
  PROBE_S=$SCALE_S probe_start 64 || fail "the probe did not start"
  deadline=$(( $(date +%s) + SCALE_S )); now=$start
  while [ "$(date +%s)" -lt "$deadline" ]; do
    now=$(hpa_desired || true); now=${now:-0}; k get hpa recserve-triton --no-headers || true
    [ "$now" -gt "$start" ] && break; sleep 10
  done
  if [ "$now" -gt "$start" ]; then echo "PASS: the HPA scaled out: $start -> $now"
  else fail "the HPA did not scale out within ${SCALE_S}s (desired replicas stayed $now)"; fi
  PROBE_S=$SCALE_S probe_verdict
  k logs recserve-probe | tail -20 || true
  verdict overload
}

case "${1:-}" in
  crash) drill_crash ;; hang) drill_hang ;; operator-crash) drill_operator_crash ;; overload) drill_overload ;;
  bad-rollout) drill_rollout "${2:-}" RolledBack ;; rollover) drill_rollout "${2:-}" Succeeded ;;
  *) sed -n '2,6p' "$0"; exit 2 ;;
esac
