"""Models fetched from the Hugging Face hub into its cache, with one-line errors when that cannot work."""

from __future__ import annotations

from pathlib import Path

from ..errors import HubUnavailable


def download_from_hub(repo_id: str, *, config_only: bool = False) -> Path:
    """Fetch a hub repository (or only its config.json) into the huggingface_hub cache."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise HubUnavailable(
            f"{repo_id!r} is not a local path and huggingface_hub is not installed: "
            "pip install 'edgekit[build]', or give a local folder or .gguf file") from None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        try:
            return _fetch(huggingface_hub, repo_id, config_only)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
            raise HubUnavailable(
                f"{repo_id!r} is not in the local Hugging Face cache and hub access is off (HF_HUB_OFFLINE): "
                "download it where there is a network, or give a local folder or .gguf file") from None
    _check_reachable(repo_id, constants.ENDPOINT)
    try:
        return _fetch(huggingface_hub, repo_id, config_only)
    except RepositoryNotFoundError:
        raise HubUnavailable(
            f"the hub has no repository {repo_id!r} (or it is private): check the id, or give a local "
            "folder or .gguf file") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise HubUnavailable(
            f"cannot download {repo_id!r} from the Hugging Face hub ({reason}): connect to the network, or "
            "download the model elsewhere and give its local folder") from None


def _fetch(huggingface_hub, repo_id: str, config_only: bool) -> Path:
    if config_only:
        return Path(huggingface_hub.hf_hub_download(repo_id, "config.json")).parent
    return Path(huggingface_hub.snapshot_download(
        repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]))


def _check_reachable(repo_id: str, endpoint: str) -> None:
    """Fail in milliseconds when the hub's host does not even resolve (huggingface_hub would retry for ~25 s)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(endpoint).hostname or endpoint
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise HubUnavailable(
            f"cannot download {repo_id!r}: no network connection to the Hugging Face hub ({host} does not "
            "resolve); connect to the network, or download the model elsewhere and give its local folder"
        ) from None
