//! Webhook deliveries the server has taken, one row per (app, delivery id), so that a
//! redelivery is recognised and runs nothing. `outcome` says what the delivery did.

use super::{params, OptionalExtension, Result, Sqlite};
use serde::Serialize;

/// One delivery as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    pub app: String,
    pub delivery: String,
    pub provider: String,
    pub received_at: String,
    pub sha: Option<String>,
    pub outcome: String,
}

impl Sqlite {
    /// Records a delivery; `false` (and nothing written) when the app already has one with
    /// this id.
    pub fn add_delivery(
        &self,
        app: &str,
        delivery: &str,
        provider: &str,
        at: &str,
        outcome: &str,
    ) -> Result<bool> {
        let n = self
            .c()
            .execute(
                "INSERT OR IGNORE INTO webhook_deliveries (app, delivery, provider, received_at, outcome) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![app, delivery, provider, at, outcome],
            )
            .map_err(|e| self.e(e))?;
        Ok(n == 1)
    }

    /// Sets what a delivery did (and the commit it carried).
    pub fn set_delivery_outcome(
        &self,
        app: &str,
        delivery: &str,
        sha: Option<&str>,
        outcome: &str,
    ) -> Result<()> {
        self.c()
            .execute(
                "UPDATE webhook_deliveries SET outcome = ?3, sha = COALESCE(?4, sha) WHERE app = ?1 AND delivery = ?2",
                params![app, delivery, outcome, sha],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// A delivery, if the app has one with this id.
    pub fn delivery(&self, app: &str, delivery: &str) -> Result<Option<Delivery>> {
        self.c()
            .query_row(
                "SELECT app, delivery, provider, received_at, sha, outcome FROM webhook_deliveries WHERE app = ?1 AND delivery = ?2",
                params![app, delivery],
                |r| {
                    Ok(Delivery {
                        app: r.get(0)?,
                        delivery: r.get(1)?,
                        provider: r.get(2)?,
                        received_at: r.get(3)?,
                        sha: r.get(4)?,
                        outcome: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.e(e))
    }
}
