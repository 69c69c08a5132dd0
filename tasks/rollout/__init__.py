"""The rollout's stages as plain functions with thin Prefect tasks: check the candidate (plan),
put it beside stable and move traffic (route), judge each step from the gateway's statistics
(steps), record every step in MLflow, Prefect events and the policy's webhook (history), and let
a person steer (control).

Who steers: the flow, through the gateway's admin API. A person steers through the registered
model's `rollout.control` tag (`slipway rollout rollback|approve MODEL`), which the flow reads at
every look; `rollback` also withdraws the canary itself at once, so it works even when no flow is
running.
"""
