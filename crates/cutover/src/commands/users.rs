//! `cutover user ...` and `cutover token ...`: the server's users and API tokens, written
//! straight into the history database (`--data`). Passwords are stored as argon2id hashes,
//! tokens as SHA-256: a generated password or a token is printed once and never again.

use super::{open_store, print_json};
use crate::cli::{Common, RoleArg, TokenCommand, UserCommand};
use crate::output::table;
use cutover_engine::exit;
use cutover_server::auth::Role;
use cutover_server::secret;
use cutover_store::{AuditRow, Store, Token};

fn role(r: RoleArg) -> Role {
    match r {
        RoleArg::Viewer => Role::Viewer,
        RoleArg::Deployer => Role::Deployer,
        RoleArg::Admin => Role::Admin,
    }
}

/// Names of users and tokens: what fits in a URL, a log line and a table cell.
fn check_name(what: &str, name: &str) -> Result<(), i32> {
    let ok = (1..=40).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
    if ok {
        return Ok(());
    }
    eprintln!("error: {what} name {name:?}: 1 to 40 letters, digits, '.', '_', '-' or '@', starting with a letter or digit");
    Err(exit::USAGE)
}

fn audit(store: &Store, action: &str, detail: String) {
    let who = format!("cli:{}", cutover_engine::identity::me("", "").user);
    let _ = store.audit(&AuditRow {
        at: cutover_engine::now_utc(),
        who,
        action: action.into(),
        from: Some("cli".into()),
        detail,
        ..AuditRow::default()
    });
}

/// The password from stdin's first line, or a generated one (printed by the caller).
fn password(from_stdin: bool) -> Result<(String, bool), i32> {
    if !from_stdin {
        return Ok((secret::new_password(), true));
    }
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("error: cannot read the password from stdin: {e}");
        return Err(exit::USAGE);
    }
    let pw = line.trim_end_matches(['\n', '\r']).to_string();
    if pw.chars().count() < 8 {
        eprintln!("error: the password on stdin is shorter than 8 characters");
        return Err(exit::USAGE);
    }
    if pw.len() > 1024 {
        eprintln!("error: the password on stdin is longer than 1024 bytes");
        return Err(exit::USAGE);
    }
    Ok((pw, false))
}

fn hashed(pw: &str) -> Result<String, i32> {
    secret::hash_password(pw).map_err(|e| {
        eprintln!("error: cannot hash the password: {e}");
        exit::NEEDS_PERSON
    })
}

/// `90d`: whole days (the config's durations stop at hours).
fn days(text: &str) -> Option<std::time::Duration> {
    let n: u64 = text.strip_suffix('d')?.parse().ok()?;
    Some(std::time::Duration::from_secs(n.checked_mul(86_400)?))
}

fn store_err(e: cutover_store::StoreError) -> i32 {
    eprintln!("error: {e}");
    exit::NEEDS_PERSON
}

pub(crate) fn user(common: &Common, cmd: UserCommand) -> i32 {
    match user_inner(common, cmd) {
        Ok(()) => exit::OK,
        Err(code) => code,
    }
}

fn user_inner(common: &Common, cmd: UserCommand) -> Result<(), i32> {
    let (store, _) = open_store(common)?;
    match cmd {
        UserCommand::Add {
            name,
            role: r,
            password_stdin,
        } => {
            check_name("user", &name)?;
            let (pw, generated) = password(password_stdin)?;
            let hash = hashed(&pw)?;
            let r = role(r);
            if !store
                .add_user(&name, r, &hash, &cutover_engine::now_utc())
                .map_err(store_err)?
            {
                eprintln!("error: user {name} exists already (cutover user passwd {name} sets a new password)");
                return Err(exit::USAGE);
            }
            audit(&store, "user added", format!("{name} ({r})"));
            eprintln!("added user {name} ({r})");
            if generated {
                println!("{pw}");
                eprintln!("(the password above is shown once: store it now)");
            }
        }
        UserCommand::List { json } => {
            let users = store.users().map_err(store_err)?;
            if json {
                print_json(&users);
            } else {
                let rows: Vec<Vec<String>> = users
                    .iter()
                    .map(|u| vec![u.name.clone(), u.role.to_string(), u.created_at.clone()])
                    .collect();
                print!("{}", table(&["USER", "ROLE", "CREATED"], &rows));
            }
        }
        UserCommand::Remove { name } => {
            if !store.remove_user(&name).map_err(store_err)? {
                eprintln!("error: no user {name}");
                return Err(exit::USAGE);
            }
            audit(&store, "user removed", name.clone());
            eprintln!("removed user {name} (their sessions ended)");
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            if store.user(&name).map_err(store_err)?.is_none() {
                eprintln!("error: no user {name}");
                return Err(exit::USAGE);
            }
            let (pw, generated) = password(password_stdin)?;
            let hash = hashed(&pw)?;
            store.set_password(&name, &hash).map_err(store_err)?;
            audit(&store, "password set", name.clone());
            eprintln!("set a new password for {name} (their sessions ended)");
            if generated {
                println!("{pw}");
                eprintln!("(the password above is shown once: store it now)");
            }
        }
    }
    Ok(())
}

pub(crate) fn token(common: &Common, cmd: TokenCommand) -> i32 {
    match token_inner(common, cmd) {
        Ok(()) => exit::OK,
        Err(code) => code,
    }
}

fn token_inner(common: &Common, cmd: TokenCommand) -> Result<(), i32> {
    let (store, _) = open_store(common)?;
    match cmd {
        TokenCommand::Create {
            name,
            role: r,
            apps,
            expires,
        } => {
            check_name("token", &name)?;
            for a in &apps {
                if !cutover_core::config::valid_app_name(a) {
                    eprintln!("error: --app {a:?} is not an app name (^[a-z][a-z0-9-]{{0,39}}$)");
                    return Err(exit::USAGE);
                }
            }
            let expires_at = match expires.as_deref() {
                None => None,
                Some(text) => match days(text)
                    .map(Ok)
                    .unwrap_or_else(|| cutover_core::duration::parse_duration(text))
                {
                    Ok(d) if d.as_secs() > 0 => {
                        Some((cutover_engine::now_secs() + d.as_secs()) as i64)
                    }
                    Ok(_) => {
                        eprintln!("error: --expires {text}: a token must be valid for at least 1s");
                        return Err(exit::USAGE);
                    }
                    Err(e) => {
                        eprintln!("error: --expires {text}: {e}");
                        return Err(exit::USAGE);
                    }
                },
            };
            let secret_token = secret::new_token();
            let r = role(r);
            let t = Token {
                name: name.clone(),
                hash: secret::digest(&secret_token),
                role: r,
                apps: if apps.is_empty() {
                    None
                } else {
                    Some(apps.clone())
                },
                created_at: cutover_engine::now_utc(),
                expires_at,
                last_used_at: None,
                revoked_at: None,
            };
            if !store.add_token(&t).map_err(store_err)? {
                eprintln!("error: a token named {name} exists already (cutover token revoke {name}, or choose another name)");
                return Err(exit::USAGE);
            }
            let scope = if apps.is_empty() {
                "every app".to_string()
            } else {
                format!("apps {}", apps.join(", "))
            };
            let until = expires_at.map_or("never expires".to_string(), |e| {
                format!("expires {}", cutover_core::format_utc(e as u64))
            });
            audit(
                &store,
                "token created",
                format!("{name} ({r}, {scope}, {until})"),
            );
            println!("{secret_token}");
            eprintln!("created token {name} ({r}, {scope}, {until}); it is shown once: store it now (CUTOVER_TOKEN)");
        }
        TokenCommand::List { json } => {
            let tokens = store.tokens().map_err(store_err)?;
            if json {
                print_json(&tokens);
            } else {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.role.to_string(),
                            t.apps.as_ref().map_or("*".into(), |a| a.join(",")),
                            t.expires_at
                                .map_or("never".into(), |e| cutover_core::format_utc(e as u64)),
                            t.last_used_at.clone().unwrap_or_else(|| "never".into()),
                            t.revoked_at.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["TOKEN", "ROLE", "APPS", "EXPIRES", "LAST USED", "REVOKED"],
                        &rows
                    )
                );
            }
        }
        TokenCommand::Revoke { name } => {
            if !store
                .revoke_token(&name, &cutover_engine::now_utc())
                .map_err(store_err)?
            {
                eprintln!("error: no token {name} that is not revoked already");
                return Err(exit::USAGE);
            }
            audit(&store, "token revoked", name.clone());
            eprintln!("revoked token {name}");
        }
    }
    Ok(())
}
