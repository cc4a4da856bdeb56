"""ComfyUI adapters: one module per concern, each exporting NODES, gathered into one extension here."""

from comfy_api.latest import ComfyExtension, io

from . import bank, captions, clustering, embedding, evaluation, guidance, report


class FineXtractExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*guidance.NODES, *bank.NODES, *embedding.NODES, *clustering.NODES, *evaluation.NODES, *report.NODES,
                *captions.NODES]


async def comfy_entrypoint() -> FineXtractExtension:
    return FineXtractExtension()
