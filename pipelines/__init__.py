"""Model adapters (import flowrl.pipelines)."""
