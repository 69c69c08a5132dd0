"""The rollout's stages as plain functions with thin Prefect tasks: check the candidate (plan),
put it beside stable and move traffic (route), judge each step from the gateway's statistics
(steps), promote it (promote: the one sequence a rollout and a revert share), record every step
in MLflow, Prefect events and the policy's webhook (history, record), and let a person steer
(control). A revert (revert) puts `previous` back in one step; the reconcile (reconcile) settles
what a killed rollout or revert left, by the in-flight claim each holds while it moves traffic
(inflight).

Who steers: the flow, through the gateway's admin API. A person steers through the registered
model's `rollout.control` tag (`slipway rollout rollback|approve MODEL`), which the flow reads at
every look; `rollback` also withdraws the canary itself at once, so it works even when no flow is
running.
"""
