"""Human feedback: rankings and production thumbs as preference pairs with provenance, rater agreement,
and the versioned feedback batches the ``feedback`` flow learns from."""
