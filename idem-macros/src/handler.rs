//! Checking the annotated function's signature: `async fn name([self,] tx: &mut Tx, msg: M)
//! -> Result<T, E>`, or, on a store without a transaction (Redis), `async fn name([self,]
//! msg: M) -> Result<T, E>`.

use syn::spanned::Spanned;
use syn::{FnArg, PatType, ReturnType, Signature, Type};

use crate::config::StoreKind;
use crate::errors::Errors;

/// The parts of the signature the expansion needs.
pub(crate) struct Handler {
    pub(crate) receiver: Option<syn::Receiver>,
    /// `None` on a store without a transaction (Redis).
    pub(crate) tx: Option<PatType>,
    pub(crate) message: PatType,
    pub(crate) output: Type,
    /// `batch`: `M` in the message parameter's `&[M]`.
    pub(crate) batch_element: Option<Type>,
}

fn tx_example(store: Option<StoreKind>) -> &'static str {
    match store {
        Some(StoreKind::Sqlite) => "tx: &mut SqliteTx<'_>",
        Some(StoreKind::MySql) => "tx: &mut MySqlTx<'_>",
        Some(StoreKind::Memory) => "tx: &mut MemoryTx",
        _ => "tx: &mut PgTx<'_>",
    }
}

pub(crate) fn check(
    sig: &Signature,
    store: Option<StoreKind>,
    batch: bool,
    errors: &mut Errors,
) -> Option<Handler> {
    let tx_example = tx_example(store);
    if let Some(token) = &sig.constness {
        errors.error(
            token.span,
            "an `#[idempotent]` handler cannot be a `const fn`: it runs a database transaction; remove `const`",
        );
    }
    if let Some(token) = &sig.unsafety {
        errors.error(
            token.span,
            "an `#[idempotent]` handler cannot be an `unsafe fn`; remove `unsafe` and keep unsafe code in a block inside the body",
        );
    }
    if let Some(abi) = &sig.abi {
        errors.error(
            abi.span(),
            "an `#[idempotent]` handler cannot have an `extern` ABI; remove it and call the handler from a Rust wrapper",
        );
    }
    if sig.asyncness.is_none() {
        errors.error(
            sig.fn_token.span,
            "`#[idempotent]` handlers must be `async fn`: the gate, the body and the commit are awaited; add `async`",
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.error(
            variadic.span(),
            "an `#[idempotent]` handler cannot be variadic",
        );
    }

    let mut receiver = None;
    let mut typed = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => receiver = Some(r.clone()),
            FnArg::Typed(pat_type) => typed.push(pat_type.clone()),
        }
    }
    let (tx, message) = if store.is_some_and(|store| !store.has_transaction()) {
        without_transaction(sig, &typed, errors)
    } else {
        with_transaction(sig, &typed, tx_example, errors)
    };
    if let Some(tx) = &tx {
        let is_mut_ref = matches!(&*tx.ty, Type::Reference(r) if r.mutability.is_some());
        if !is_mut_ref {
            errors.error(
                tx.ty.span(),
                format!(
                    "the first parameter is the handler's transaction and must be a mutable reference: `{tx_example}`"
                ),
            );
        }
    }
    if let Some(message) = &message
        && matches!(&*message.ty, Type::Reference(r) if r.mutability.is_some())
    {
        errors.error(
            message.ty.span(),
            "the message must be taken by value or shared reference, not `&mut`: the handler may not change what it was given",
        );
    }
    let batch_element = match (&message, batch) {
        (Some(message), true) => match &*message.ty {
            Type::Reference(reference) if reference.mutability.is_none() => match &*reference.elem
            {
                Type::Slice(slice) => Some((*slice.elem).clone()),
                _ => None,
            },
            _ => None,
        }
        .or_else(|| {
            errors.error(
                message.ty.span(),
                "a `batch` handler takes its messages as a slice, `msgs: &[YourMessage]`: the body gets the fresh messages of the batch, and a part of them again when a failing batch is split",
            );
            None
        }),
        _ => None,
    };
    let output = match &sig.output {
        ReturnType::Type(_, ty) if is_never_a_result(ty) => {
            let shown = quote::ToTokens::to_token_stream(ty).to_string();
            errors.error(
                ty.span(),
                format!(
                    "an `#[idempotent]` handler must return `Result<T, E>`, not `{shown}`, so that a failure rolls back and requeues; return `Result<{shown}, YourError>`"
                ),
            );
            None
        }
        ReturnType::Type(_, ty) => Some((**ty).clone()),
        ReturnType::Default => {
            errors.error(
                sig.paren_token.span.close(),
                "an `#[idempotent]` handler must return `Result<T, E>` so that a failure rolls back and requeues; add `-> Result<(), YourError>`",
            );
            None
        }
    };
    Some(Handler {
        receiver,
        tx,
        message: message?,
        output: output?,
        batch_element: if batch { Some(batch_element?) } else { None },
    })
}

/// `(tx, msg)`: the transaction, then the message.
fn with_transaction(
    sig: &Signature,
    typed: &[PatType],
    tx_example: &str,
    errors: &mut Errors,
) -> (Option<PatType>, Option<PatType>) {
    let shape = format!("`({tx_example}, msg: YourMessage)`");
    match typed.len() {
        0 => {
            errors.error(
                sig.paren_token.span.join(),
                format!(
                    "an `#[idempotent]` handler takes the transaction and the message: {shape}"
                ),
            );
            (None, None)
        }
        1 => {
            errors.error(
                typed[0].span(),
                format!(
                    "an `#[idempotent]` handler takes two parameters, the transaction then the message: {shape}"
                ),
            );
            (None, None)
        }
        2 => (Some(typed[0].clone()), Some(typed[1].clone())),
        _ => {
            for extra in &typed[2..] {
                errors.error(
                    extra.span(),
                    format!(
                        "unexpected parameter: an `#[idempotent]` handler takes the transaction and the message only, {shape}; reach other state through `self` or the message"
                    ),
                );
            }
            (None, None)
        }
    }
}

/// `(msg)`: Redis keeps leases and markers, and has no transaction to hand the body.
fn without_transaction(
    sig: &Signature,
    typed: &[PatType],
    errors: &mut Errors,
) -> (Option<PatType>, Option<PatType>) {
    match typed {
        [] => {
            errors.error(
                sig.paren_token.span.join(),
                "an `#[idempotent(store = \"redis\")]` handler takes the message: `(msg: YourMessage)`",
            );
            (None, None)
        }
        [message] => (None, Some(message.clone())),
        [first, ..] if matches!(&*first.ty, Type::Reference(r) if r.mutability.is_some()) => {
            errors.error(
                first.span(),
                "`store = \"redis\"` has no transaction to give the handler: Redis cannot share your database's, so take only the message, `(msg: YourMessage)`, and open your own transaction in the body if it writes SQL (or gate in that database: `store = \"pg\"` with `dedup_table`, where the record commits with the writes)",
            );
            (None, None)
        }
        [_, extra @ ..] => {
            for extra in extra {
                errors.error(
                    extra.span(),
                    "unexpected parameter: an `#[idempotent(store = \"redis\")]` handler takes the message only, `(msg: YourMessage)`; reach other state through `self` or the message",
                );
            }
            (None, None)
        }
    }
}

/// The default scope is `module_path::function_name`: unique for a free, non-generic function,
/// shared by every type's method of that name in the module and by every instantiation of a
/// generic function. There, an explicit `scope` is required.
pub(crate) fn require_scope_where_the_default_is_shared(sig: &Signature, errors: &mut Errors) {
    let name = sig.ident.to_string();
    let receiver = sig.inputs.iter().find_map(|input| match input {
        FnArg::Receiver(receiver) => Some(receiver),
        FnArg::Typed(_) => None,
    });
    if let Some(receiver) = receiver {
        errors.error(
            receiver.span(),
            format!(
                "`#[idempotent]` on a method needs an explicit `scope`: the default, `module::{name}`, is the same for every type's `{name}` in this module, so two handlers would share dedup records and one would skip the other's messages as duplicates; add `scope = \"<service>.<handler>\"` (e.g. `scope = \"emailer.{name}\"`), a short name that survives renames"
            ),
        );
        return;
    }
    let generic = sig.generics.params.iter().find(|param| {
        matches!(
            param,
            syn::GenericParam::Type(_) | syn::GenericParam::Const(_)
        )
    });
    let impl_trait = sig.inputs.iter().find_map(|input| match input {
        FnArg::Typed(typed) => find_impl_trait(&typed.ty),
        FnArg::Receiver(_) => None,
    });
    let generic = generic
        .map(Spanned::span)
        .or_else(|| impl_trait.map(Spanned::span));
    if let Some(generic) = generic {
        errors.error(
            generic,
            format!(
                "a generic `#[idempotent]` handler needs an explicit `scope`: every instantiation shares the default, `module::{name}`, and so its dedup records; add `scope = \"<service>.<handler>\"`, and make the key tell the instantiations apart if they handle the same messages (or write one handler per type)"
            ),
        );
    }
}

/// The first `impl Trait` in `ty`: an anonymous type parameter, as generic as a named one.
fn find_impl_trait(ty: &Type) -> Option<&syn::TypeImplTrait> {
    struct Find<'a>(Option<&'a syn::TypeImplTrait>);
    impl<'a> syn::visit::Visit<'a> for Find<'a> {
        fn visit_type_impl_trait(&mut self, found: &'a syn::TypeImplTrait) {
            self.0.get_or_insert(found);
        }
    }
    let mut find = Find(None);
    syn::visit::Visit::visit_type(&mut find, ty);
    find.0
}

/// Types that are certainly not a `Result` (an alias such as `AppResult<T>` may be one, so
/// other paths are left to the compiler's `HandlerResult` check).
fn is_never_a_result(ty: &Type) -> bool {
    const NOT_RESULTS: &[&str] = &[
        "bool", "char", "str", "String", "Option", "Vec", "Box", "i8", "i16", "i32", "i64", "i128",
        "isize", "u8", "u16", "u32", "u64", "u128", "usize", "f32", "f64",
    ];
    match ty {
        Type::Path(path) => {
            path.qself.is_none()
                && path
                    .path
                    .segments
                    .last()
                    .is_some_and(|last| NOT_RESULTS.iter().any(|name| last.ident == name))
        }
        Type::Paren(inner) => is_never_a_result(&inner.elem),
        Type::Group(inner) => is_never_a_result(&inner.elem),
        Type::Array(_)
        | Type::Never(_)
        | Type::Ptr(_)
        | Type::Reference(_)
        | Type::Slice(_)
        | Type::Tuple(_)
        | Type::BareFn(_)
        | Type::ImplTrait(_)
        | Type::TraitObject(_) => true,
        _ => false,
    }
}
