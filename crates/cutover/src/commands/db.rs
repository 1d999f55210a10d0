//! `cutover db copy --from PATH --to URL`: an SQLite history into an empty PostgreSQL
//! database (`cutover_store::copy_sqlite_to_postgres`), for a team moving to several servers.

use crate::cli::{Common, DbCommand};
use cutover_engine::exit;
use cutover_store::StoreError;

pub(crate) fn run(common: &Common, command: DbCommand) -> i32 {
    match command {
        DbCommand::Copy { from, to } => {
            if let Err(e) = to.check() {
                eprintln!("error: {}", e.replacen("--database", "--to", 1));
                return exit::USAGE;
            }
            let from = from.unwrap_or_else(|| super::data_dir(common));
            let file = if from.is_dir() {
                from.join("cutover.db")
            } else {
                from
            };
            if !file.is_file() {
                eprintln!(
                    "error: --from {}: no such SQLite history (a cutover.db file, or a data directory holding one)",
                    file.display()
                );
                return exit::USAGE;
            }
            match cutover_store::copy_sqlite_to_postgres(&file, &to.0) {
                Ok(copied) => {
                    let rows: u64 = copied.iter().map(|c| c.rows).sum();
                    for c in &copied {
                        println!("{:>8}  {}", c.rows, c.table);
                    }
                    println!(
                        "copied {rows} rows of {} tables from {} into {to:?}",
                        copied.len(),
                        file.display()
                    );
                    exit::OK
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    match e {
                        StoreError::Url { .. } | StoreError::NotOurs { .. } => exit::USAGE,
                        _ => exit::NEEDS_PERSON,
                    }
                }
            }
        }
    }
}
