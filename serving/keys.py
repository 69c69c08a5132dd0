"""Make secrets for the gateway config: prints a new key once, with the hash the config stores.

    python -m serving.keys new TENANT     # a tenant API key
    python -m serving.keys admin          # the admin token
"""

from __future__ import annotations

import secrets

import click

from serving.auth import key_hash


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


@click.group()
def cli() -> None:
    """Gateway secrets. The secret is shown once; store it, put only the hash in the config."""


@cli.command()
@click.argument("tenant")
def new(tenant: str) -> None:
    """A new API key for TENANT."""
    key = new_secret("sk-slipway-")
    click.echo(f"key (shown once, give it to {tenant}): {key}")
    click.echo("config entry for configs/gateway.yaml tenants:")
    click.echo(f"  - name: {tenant}\n    key_sha256: {key_hash(key)}")


@cli.command()
def admin() -> None:
    """A new admin token (for the rollout flow)."""
    token = new_secret("sk-slipway-admin-")
    click.echo(f"admin token (shown once): {token}")
    click.echo(f"admin_token_sha256: {key_hash(token)}")


if __name__ == "__main__":
    cli()
