"""The local operator behind `make up`: the processes it starts, the Prefect stack, the generated
gateway config."""
