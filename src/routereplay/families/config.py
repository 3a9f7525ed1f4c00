"""`ConfigView`: one way to read a transformers config object or a config.json dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from routereplay.errors import LayoutError


class ConfigView:
    """Reads the text model's fields of a transformers config object (with its
    attribute aliases) or of a plain `config.json` dict.

    Multimodal configs are read through their `text_config`: the decoder that routes.
    """

    def __init__(self, config: Any) -> None:
        self._config = config
        text = self.get("text_config")
        if text is not None:
            self._config = text

    def get(self, key: str) -> Any:
        if isinstance(self._config, Mapping):
            return self._config.get(key)
        return getattr(self._config, key, None)

    @property
    def model_type(self) -> str:
        return str(self.get("model_type") or "")

    def require(self, *keys: str) -> Any:
        """The first of `keys` the config sets (families and transformers versions name
        some fields differently); an error naming all of them if none is set."""
        for key in keys:
            value = self.get(key)
            if value is not None:
                return value
        raise LayoutError(
            f"{self.model_type} config has no {' or '.join(keys)}; cannot build a layout."
        )
