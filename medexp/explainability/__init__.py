"""Why a model decided as it did: saliency maps and their scores against lesion masks."""
