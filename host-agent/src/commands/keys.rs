//! `keys generate --out DIR`: the publisher key pair that signs firmware. Needs no relay.

use std::io::Write;

use anyhow::Context as _;

use crate::cli::{KeysCommand, KeysGenerateArgs};
use crate::keys;

pub fn run(cmd: KeysCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Generate(args) => generate(args, out),
    }
}

/// Writes the pair and says what each half is for.
fn generate(args: KeysGenerateArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let paths = keys::write_pair(&args.out, &keys::generate())?;
    let (secret, public) = (paths.secret.display(), paths.public.display());
    writeln!(
        out,
        "secret key: {secret}  (readable only by you; sign uploads with \
         `host-agent … artifacts upload FILE --version V --signing-key {secret}`)\n\
         public key: {public}\n\
         provision every device with it: device-agent … --publisher-key {public}"
    )
    .context("writing to stdout")?;
    Ok(())
}
