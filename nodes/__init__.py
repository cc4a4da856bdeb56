"""ComfyUI adapters: one module per concern, each exporting NODES, gathered into one extension here."""

from comfy_api.latest import ComfyExtension, io

from . import bank, captions, clustering, deprecated, embedding, evaluation, evidence, prescreen, report, sampling


class FineXtractExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*sampling.NODES, *bank.NODES, *embedding.NODES, *clustering.NODES, *evaluation.NODES, *report.NODES,
                *captions.NODES, *deprecated.NODES, *evidence.NODES, *prescreen.NODES]


async def comfy_entrypoint() -> FineXtractExtension:
    return FineXtractExtension()
