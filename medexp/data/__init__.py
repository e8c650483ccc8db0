"""Datasets and LightningDataModules. Kept import-light: config resolvers read the metadata here."""
